{{/* The chart's name. */}}
{{- define "hoard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resources' name: the release name, with the chart's name unless it contains it. */}}
{{- define "hoard.fullname" -}}
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

{{/* Selector labels: never change them on an existing release. */}}
{{- define "hoard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hoard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "hoard.labels" -}}
{{ include "hoard.selectorLabels" . }}
app.kubernetes.io/component: cache
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The whole hoard.toml. */}}
{{- define "hoard.config" -}}
listen = "0.0.0.0:9092"
# Plaintext probes (grpc.health.v1, /healthz, /readyz) and /metrics.
ops_listen = "0.0.0.0:9093"
# The pod's PersistentVolumeClaim (volumeClaimTemplates "data").
data_dir = "/data"
drain_delay = {{ .Values.drainDelay | toString | quote }}
{{ .Values.config }}
{{- end }}

{{/* terminationGracePeriodSeconds, refused when it cannot cover drainDelay + 30 s + flush. */}}
{{- define "hoard.gracePeriod" -}}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $drain := toString .Values.drainDelay }}
{{- if regexMatch "^[0-9]+s$" $drain }}
{{- $need := add (atoi (trimSuffix "s" $drain)) 50 }}
{{- if lt $grace (int $need) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must cover drainDelay (%s) + 30 s for in-flight calls + ~20 s for the flush: at least %d" $grace $drain (int $need)) }}
{{- end }}
{{- end }}
{{- $grace }}
{{- end }}
