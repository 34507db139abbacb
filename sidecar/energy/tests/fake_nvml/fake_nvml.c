/*
 * A stand-in for libnvidia-ml with scripted answers, loaded by the real nvml-wrapper crate in
 * tests. At nvmlInit_v2 it reads "<path of this library>.script":
 *
 *   devices GPU-aaaa GPU-bbbb     UUIDs, one device each, in index order
 *   energy 0 1000 2000 E999 3000  answers to nvmlDeviceGetTotalEnergyConsumption for device 0
 *   power 0 250000 NS             answers to nvmlDeviceGetPowerUsage (mW) for device 0
 *
 * An answer is a number, NS (NVML_ERROR_NOT_SUPPORTED) or E<code>. Each call takes the next
 * answer; the last one repeats. Every copy of the library has its own state, so tests that
 * run in parallel each load their own copy.
 *
 *   rate 0 250000 100             a simulated GPU instead: it draws 250 W steadily; its energy
 *                                 counter advances with time, refreshed every 100 ms like a real
 *                                 one, and its power reads 250000 mW
 *   rate 0 250000 100 200000      the same, but its power sensor reads 200000 mW (miscalibrated)
 *   limit-settable                every device's power limit (300 W, range 100-400 W) may be set;
 *                                 without it setting one answers NVML_ERROR_NO_PERMISSION
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_DEVICES 8
#define MAX_ANSWERS 256
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NO_PERMISSION 4
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_UNKNOWN 999

typedef struct {
    int code[MAX_ANSWERS];
    unsigned long long value[MAX_ANSWERS];
    int len;
    int next;
} script_t;

typedef struct {
    char uuid[96];
    script_t energy;
    script_t power;
    unsigned long long rate_mw;   /* 0: scripted answers; else a steady simulated draw */
    unsigned long long update_ms; /* counter refresh period of the simulated GPU */
    unsigned long long shown_mw;  /* what its power sensor reads */
} device_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static device_t devices[MAX_DEVICES];
static unsigned int device_count = 0;
static int limit_settable = 0;
static unsigned int limit_mw = 300000;
static int initialised = 0; /* NVML counts inits; so does this */
static struct timespec started;

static double seconds_since_init(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - started.tv_sec) + (double)(now.tv_nsec - started.tv_nsec) / 1e9;
}

static void parse_answers(script_t *s, char *rest) {
    char *save = NULL;
    for (char *tok = strtok_r(rest, " \t\n", &save); tok && s->len < MAX_ANSWERS;
         tok = strtok_r(NULL, " \t\n", &save)) {
        int i = s->len++;
        if (strcmp(tok, "NS") == 0) {
            s->code[i] = NVML_ERROR_NOT_SUPPORTED;
        } else if (tok[0] == 'E') {
            s->code[i] = atoi(tok + 1);
        } else {
            s->code[i] = NVML_SUCCESS;
            s->value[i] = strtoull(tok, NULL, 10);
        }
    }
}

static int load_script(void) {
    Dl_info info;
    if (!dladdr((void *)&load_script, &info) || !info.dli_fname) return NVML_ERROR_UNKNOWN;
    char path[4096];
    snprintf(path, sizeof path, "%s.script", info.dli_fname);
    FILE *f = fopen(path, "r");
    if (!f) return NVML_ERROR_UNKNOWN;
    memset(devices, 0, sizeof devices);
    device_count = 0;
    limit_settable = 0;
    char line[8192];
    while (fgets(line, sizeof line, f)) {
        char *save = NULL;
        char *word = strtok_r(line, " \t\n", &save);
        if (!word) continue;
        if (strcmp(word, "limit-settable") == 0) {
            limit_settable = 1;
        } else if (strcmp(word, "devices") == 0) {
            for (char *u = strtok_r(NULL, " \t\n", &save); u && device_count < MAX_DEVICES;
                 u = strtok_r(NULL, " \t\n", &save)) {
                snprintf(devices[device_count++].uuid, sizeof devices[0].uuid, "%s", u);
            }
        } else if (strcmp(word, "rate") == 0) {
            char *idx = strtok_r(NULL, " \t\n", &save);
            char *mw = strtok_r(NULL, " \t\n", &save);
            char *ms = strtok_r(NULL, " \t\n", &save);
            char *shown = strtok_r(NULL, " \t\n", &save);
            if (!idx || !mw) continue;
            unsigned int d = (unsigned int)atoi(idx);
            if (d >= MAX_DEVICES) continue;
            devices[d].rate_mw = strtoull(mw, NULL, 10);
            devices[d].update_ms = ms ? strtoull(ms, NULL, 10) : 100;
            devices[d].shown_mw = shown ? strtoull(shown, NULL, 10) : devices[d].rate_mw;
        } else if (strcmp(word, "energy") == 0 || strcmp(word, "power") == 0) {
            char *idx = strtok_r(NULL, " \t\n", &save);
            if (!idx) continue;
            unsigned int d = (unsigned int)atoi(idx);
            if (d >= MAX_DEVICES) continue;
            char *rest = strtok_r(NULL, "\n", &save);
            if (!rest) continue;
            parse_answers(word[0] == 'e' ? &devices[d].energy : &devices[d].power, rest);
        }
    }
    fclose(f);
    return NVML_SUCCESS;
}

static int answer(script_t *s, unsigned long long *out) {
    if (s->len == 0) return NVML_ERROR_NOT_SUPPORTED;
    int i = s->next < s->len ? s->next++ : s->len - 1;
    if (s->code[i] == NVML_SUCCESS) *out = s->value[i];
    return s->code[i];
}

static device_t *device_of(void *handle) {
    unsigned long i = (unsigned long)handle;
    if (i == 0 || i > device_count) return NULL;
    return &devices[i - 1];
}

int nvmlInit_v2(void) {
    pthread_mutex_lock(&lock);
    int rc = NVML_SUCCESS;
    if (initialised == 0) {
        rc = load_script();
        if (rc == NVML_SUCCESS) clock_gettime(CLOCK_MONOTONIC, &started);
    }
    if (rc == NVML_SUCCESS) initialised++;
    pthread_mutex_unlock(&lock);
    return rc;
}

int nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    if (initialised > 0) initialised--;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

const char *nvmlErrorString(int result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    default: return "Unknown Error";
    }
}

int nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (length < 8) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(version, length, "%s", "550.54.15");
    return NVML_SUCCESS;
}

int nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    *count = device_count;
    return NVML_SUCCESS;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (index >= device_count) return NVML_ERROR_INVALID_ARGUMENT;
    *device = (void *)(unsigned long)(index + 1);
    return NVML_SUCCESS;
}

int nvmlDeviceGetHandleByUUID(const char *uuid, void **device) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    for (unsigned int i = 0; i < device_count; i++) {
        if (strcmp(devices[i].uuid, uuid) == 0) {
            *device = (void *)(unsigned long)(i + 1);
            return NVML_SUCCESS;
        }
    }
    return 6; /* NVML_ERROR_NOT_FOUND */
}

int nvmlDeviceGetUUID(void *device, char *uuid, unsigned int length) {
    device_t *d = device_of(device);
    if (!d) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(d->uuid) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(uuid, length, "%s", d->uuid);
    return NVML_SUCCESS;
}

int nvmlDeviceGetTotalEnergyConsumption(void *device, unsigned long long *energy) {
    device_t *d = device_of(device);
    if (!d) return NVML_ERROR_INVALID_ARGUMENT;
    if (d->rate_mw) {
        /* mW x s = mJ, as of the last refresh of the counter. */
        double period = (double)(d->update_ms ? d->update_ms : 1) / 1000.0;
        double refreshed = period * (double)(unsigned long long)(seconds_since_init() / period);
        *energy = 1000000ULL + (unsigned long long)((double)d->rate_mw * refreshed);
        return NVML_SUCCESS;
    }
    pthread_mutex_lock(&lock);
    int rc = answer(&d->energy, energy);
    pthread_mutex_unlock(&lock);
    return rc;
}

int nvmlDeviceGetPowerUsage(void *device, unsigned int *power) {
    device_t *d = device_of(device);
    if (!d) return NVML_ERROR_INVALID_ARGUMENT;
    if (d->rate_mw) {
        *power = (unsigned int)d->shown_mw;
        return NVML_SUCCESS;
    }
    unsigned long long v = 0;
    pthread_mutex_lock(&lock);
    int rc = answer(&d->power, &v);
    pthread_mutex_unlock(&lock);
    if (rc == NVML_SUCCESS) *power = (unsigned int)v;
    return rc;
}

int nvmlDeviceGetPowerManagementLimit(void *device, unsigned int *limit) {
    if (!device_of(device)) return NVML_ERROR_INVALID_ARGUMENT;
    *limit = limit_mw;
    return NVML_SUCCESS;
}

int nvmlDeviceGetPowerManagementLimitConstraints(void *device, unsigned int *min,
                                                 unsigned int *max) {
    if (!device_of(device)) return NVML_ERROR_INVALID_ARGUMENT;
    *min = 100000;
    *max = 400000;
    return NVML_SUCCESS;
}

int nvmlDeviceSetPowerManagementLimit(void *device, unsigned int limit) {
    if (!device_of(device)) return NVML_ERROR_INVALID_ARGUMENT;
    if (!limit_settable) return NVML_ERROR_NO_PERMISSION;
    if (limit < 100000 || limit > 400000) return NVML_ERROR_INVALID_ARGUMENT;
    limit_mw = limit;
    return NVML_SUCCESS;
}
