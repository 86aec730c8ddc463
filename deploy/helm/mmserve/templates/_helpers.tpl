{{/* Names and labels. */}}
{{- define "mmserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mmserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mmserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mmserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "mmserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: model-server
{{- end -}}

{{- define "mmserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mmserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mmserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Values.variant .Values.image.tag) -}}
{{- end -}}

{{/* The drain: the grace period covers preStop, the drain period, the in-flight deadline and a margin. */}}
{{- define "mmserve.gracePeriod" -}}
{{- $d := .Values.drain -}}
{{- add $d.preStopSleepSeconds $d.drainPeriodSeconds $d.shutdownTimeoutSeconds $d.marginSeconds -}}
{{- end -}}

{{/* The autoscaling signal's metric name as the service exports it. */}}
{{- define "mmserve.signalMetric" -}}
{{- if eq .Values.autoscaling.signal "queue" -}}mmserve_queue_depth{{- else -}}mmserve_inflight_requests{{- end -}}
{{- end -}}

{{- define "mmserve.hasPrometheusOperator" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor" -}}true{{- end -}}
{{- end -}}
