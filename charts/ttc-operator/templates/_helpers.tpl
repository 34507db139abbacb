{{/* The chart name. */}}
{{- define "ttc-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: object names of this release (cluster-scoped ones included). */}}
{{- define "ttc-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ttc-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ttc-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ttc-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ttc-operator.labels" -}}
helm.sh/chart: {{ include "ttc-operator.chart" . }}
{{ include "ttc-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ttc-operator
{{- end }}

{{- define "ttc-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ttc-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ttc-operator.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "ttc-operator.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) }}
{{- end }}

{{/* The webhook Service's DNS name, the name in the webhook certificate. */}}
{{- define "ttc-operator.serviceHost" -}}
{{- printf "%s.%s.svc" (include "ttc-operator.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "ttc-operator.tlsSecretName" -}}
{{- printf "%s-webhook-tls" (include "ttc-operator.fullname" .) }}
{{- end }}

{{- define "ttc-operator.otlpEndpoint" -}}
{{- $scheme := ternary "https" "http" .Values.operator.receiverTls }}
{{- default (printf "%s://%s:%v" $scheme (include "ttc-operator.serviceHost" .) .Values.service.receiverPort) .Values.sidecar.otlpEndpoint }}
{{- end }}
