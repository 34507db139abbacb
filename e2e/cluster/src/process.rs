//! Child processes of the control plane, and the guarantee that none outlives us.
//!
//! Linux ties `PR_SET_PDEATHSIG` to the *thread* that forked the child, not to the process: a
//! child spawned from a short-lived thread (a tokio blocking worker, a test thread) is killed as
//! soon as that thread exits. So every child is spawned by one dedicated thread that lives as
//! long as the process, and each child also gets its own process group so that it can be
//! stopped as a whole.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A request to the spawner thread: a command to start and where to send the result.
struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<std::io::Result<Child>>,
}

static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();

fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        // The thread never ends: the sender lives in a static, so `recv` never fails.
        let spawned = std::thread::Builder::new()
            .name("ttc-e2e-spawner".into())
            .spawn(move || {
                while let Ok(mut request) = rx.recv() {
                    let _ = request.reply.send(request.command.spawn());
                }
            });
        if let Err(e) = spawned {
            // Without the thread no child can be started; each spawn then reports this.
            tracing::error!("cannot start the process spawner thread: {e}");
        }
        tx
    })
}

/// Starts `command` from the long-lived spawner thread, in a new process group, with
/// `SIGKILL` as its parent-death signal.
fn spawn_supervised(mut command: Command) -> std::io::Result<Child> {
    // SAFETY: getpid is async-signal-safe and has no preconditions.
    let parent = unsafe { libc::getpid() };
    command.process_group(0);
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // functions (prctl, getppid); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody would kill us.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner()
        .send(SpawnRequest { command, reply })
        .map_err(|_| std::io::Error::other("the process spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the process spawner thread did not answer"))?
}

/// Starts `binary` as a supervised child writing stdout and stderr to `out` (the file `log`).
fn spawn_logged(
    name: &str,
    binary: &Path,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
    out: File,
) -> Result<Child> {
    let err = out
        .try_clone()
        .map_err(|e| Error::io("opening log file", log, e))?;
    let mut command = Command::new(binary);
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let child = spawn_supervised(command).map_err(|source| Error::Spawn {
        component: name.into(),
        binary: binary.into(),
        log: log.into(),
        source,
    })?;
    tracing::debug!(component = name, pid = child.id(), log = %log.display(), "started");
    Ok(child)
}

/// Runs a short-lived tool (`ip`, `iptables`, `ctr`, `crictl`, ...) to completion; its stdout, or
/// an error with its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::Node(format!("running {program}: {e}")))?;
    if !output.status.success() {
        return Err(Error::Node(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Polls `probe` every 250 ms until it succeeds; fails when any of `components` exits, or after
/// `timeout` naming the component at `target` with the tail of its log.
pub(crate) async fn wait_ready<F, Fut>(
    components: &mut [Component],
    target: usize,
    timeout: Duration,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), String>>,
{
    let started = Instant::now();
    loop {
        components
            .iter_mut()
            .try_for_each(Component::check_running)?;
        let last_check = match probe().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if started.elapsed() >= timeout {
            let component = &components[target];
            return Err(Error::NotReady {
                component: component.name().into(),
                waited: started.elapsed(),
                last_check,
                log: component.log().into(),
                tail: component.tail(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One running control-plane process: its name, its log file and its process group, and how it
/// was started (so that it can be started again after a crash).
#[derive(Debug)]
pub struct Component {
    name: String,
    log: PathBuf,
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Child,
}

impl Component {
    /// Starts `binary` with `args`, writing stdout and stderr to `log`.
    pub fn start(name: &str, binary: &Path, args: &[String], log: &Path) -> Result<Self> {
        Self::start_with_env(name, binary, args, &[], log)
    }

    /// Starts `binary` with `args` and these environment variables added to ours, writing
    /// stdout and stderr to `log`.
    pub fn start_with_env(
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<Self> {
        if !binary.is_file() {
            return Err(Error::MissingBinary {
                component: name.into(),
                path: binary.into(),
            });
        }
        let out = File::create(log).map_err(|e| Error::io("creating log file", log, e))?;
        let child = spawn_logged(name, binary, args, env, log, out)?;
        Ok(Component {
            name: name.into(),
            log: log.into(),
            binary: binary.into(),
            args: args.to_vec(),
            env: env.to_vec(),
            child,
        })
    }

    /// Kills the process group with `SIGKILL` now, as a crash would, and waits until it is gone.
    pub fn kill(&mut self) -> Result<()> {
        self.stop(Duration::ZERO)
    }

    /// Starts the component again, killing what is left of it first, with the same binary,
    /// arguments and environment; its log goes on in the same file after a marker line.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::io("opening log file", &self.log, e))?;
        std::io::Write::write_all(&mut out, b"\n--- restarted ---\n")
            .map_err(|e| Error::io("writing log file", &self.log, e))?;
        self.child = spawn_logged(
            &self.name,
            &self.binary,
            &self.args,
            &self.env,
            &self.log,
            out,
        )?;
        Ok(())
    }

    /// The component's name, as used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The component's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The process id (also the process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with [`Error::Exited`] when the process is no longer running.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Exited {
                component: self.name.clone(),
                status: status.to_string(),
                log: self.log.clone(),
                tail: log_tail(&self.log, 30),
            }),
            Err(e) => Err(Error::Exited {
                component: self.name.clone(),
                status: format!("cannot query its status: {e}"),
                log: self.log.clone(),
                tail: log_tail(&self.log, 30),
            }),
        }
    }

    /// The last lines of the component's log, for error messages.
    pub fn tail(&self) -> String {
        log_tail(&self.log, 30)
    }

    /// Sends `SIGTERM` to the process group, waits up to `grace`, then sends `SIGKILL`.
    ///
    /// Returns an error only when the process is still there after `SIGKILL`.
    pub fn stop(&mut self, grace: Duration) -> Result<()> {
        if let Ok(Some(_)) = self.child.try_wait() {
            // Already gone, but members of its group may remain.
            kill_group(self.pid(), libc::SIGKILL);
            return Ok(());
        }
        if !grace.is_zero() {
            kill_group(self.pid(), libc::SIGTERM);
            if self.wait_for_exit(grace) {
                kill_group(self.pid(), libc::SIGKILL);
                return Ok(());
            }
            tracing::warn!(component = %self.name, "did not stop within {grace:?}; killing it");
        }
        kill_group(self.pid(), libc::SIGKILL);
        if self.wait_for_exit(Duration::from_secs(10)) {
            Ok(())
        } else {
            Err(Error::Teardown {
                component: self.name.clone(),
                pid: self.pid(),
                reason: "still running 10s after SIGKILL".into(),
                log: self.log.clone(),
            })
        }
    }

    fn wait_for_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return true,
                // ECHILD: someone else reaped it; it is gone.
                Err(_) => return true,
                Ok(None) if Instant::now() >= deadline => return false,
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(5)) {
            tracing::error!("{e}");
        }
    }
}

fn kill_group(pgid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: killpg has no memory-safety preconditions; a vanished group yields ESRCH.
    unsafe {
        libc::killpg(pgid, signal);
    }
}

/// The last `lines` lines of a log file (at most the last 64 KiB are read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(cannot read {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let mut buf = Vec::new();
    if file
        .seek(SeekFrom::Start(start))
        .and_then(|_| file.read_to_end(&mut buf))
        .is_err()
    {
        return format!("(cannot read {})", path.display());
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["-c".into(), script.into()]
    }

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    }

    #[test]
    fn an_exited_component_is_reported_with_its_name_log_and_output() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("creating temp dir", "/tmp", e))?;
        let log = dir.path().join("crasher.log");
        let mut crasher = Component::start(
            "crasher",
            Path::new("/bin/sh"),
            &sh("echo boom >&2; exit 3"),
            &log,
        )?;
        assert!(
            crasher.wait_for_exit(Duration::from_secs(10)),
            "the crasher did not exit"
        );
        let message = match crasher.check_running() {
            Err(e @ Error::Exited { .. }) => e.to_string(),
            other => panic!("expected Exited, got {other:?}"),
        };
        assert!(message.contains("crasher"), "{message}");
        assert!(message.contains(&log.display().to_string()), "{message}");
        assert!(message.contains("boom"), "{message}");
        assert!(message.contains("exit status: 3"), "{message}");
        Ok(())
    }

    #[test]
    fn a_child_outlives_the_thread_that_asked_for_it_and_dies_on_stop() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("creating temp dir", "/tmp", e))?;
        let log = dir.path().join("sleeper.log");
        // Parent-death signals follow the forking thread: a child forked by this short-lived
        // thread would be killed when it ends, unless the spawner thread forked it.
        let mut sleeper = std::thread::spawn(move || {
            Component::start("sleeper", Path::new("/bin/sh"), &sh("sleep 60"), &log)
        })
        .join()
        .map_err(|_| Error::Runtime("spawning thread panicked".into()))??;
        std::thread::sleep(Duration::from_millis(300));
        sleeper.check_running()?;
        let pid = sleeper.pid();
        sleeper.stop(Duration::from_secs(5))?;
        assert!(!alive(pid), "pid {pid} survived stop()");
        Ok(())
    }

    #[test]
    fn a_missing_binary_is_named() {
        let dir = std::env::temp_dir();
        match Component::start(
            "etcd",
            Path::new("/nonexistent/etcd"),
            &[],
            &dir.join("x.log"),
        ) {
            Err(Error::MissingBinary { component, path }) => {
                assert_eq!(component, "etcd");
                assert_eq!(path, Path::new("/nonexistent/etcd"));
            }
            other => panic!("expected MissingBinary, got {other:?}"),
        }
    }
}
