{{- define "codefleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "codefleet.fullname" -}}
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

{{- define "codefleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "codefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: codefleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "codefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "codefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Object name of one model's engines: {{ include "codefleet.engineName" (list $ $m) }} */}}
{{- define "codefleet.engineName" -}}
{{- $root := index . 0 }}{{- $m := index . 1 }}
{{- printf "%s-%s" (include "codefleet.fullname" $root | trunc 22 | trimSuffix "-") $m.key | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "codefleet.frontendName" -}}
{{- printf "%s-frontend" (include "codefleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "codefleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "codefleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "codefleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "codefleet.internalKeySecret" -}}
{{- default (printf "%s-internal-key" (include "codefleet.fullname" .)) .Values.internalKey.existingSecret }}
{{- end }}

{{- define "codefleet.apiKeySecret" -}}
{{- default (printf "%s-api-keys" (include "codefleet.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "codefleet.cacheClaim" -}}
{{- default (printf "%s-model-cache" (include "codefleet.fullname" .)) .Values.modelCache.existingClaim }}
{{- end }}
