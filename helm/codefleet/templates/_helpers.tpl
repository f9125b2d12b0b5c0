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

{{/* An image reference: repository@digest when a digest is given, else repository:tag (default
the chart's appVersion). {{ include "codefleet.imageRef" (list $ .Values.image) }} */}}
{{- define "codefleet.imageRef" -}}
{{- $root := index . 0 }}{{- $img := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $root.Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{- define "codefleet.image" -}}
{{- include "codefleet.imageRef" (list . .Values.image) }}
{{- end }}

{{- define "codefleet.frontendImage" -}}
{{- include "codefleet.imageRef" (list . .Values.frontendImage) }}
{{- end }}

{{/* The most replicas a model can have: maxReplicas when autoscaled, else replicas. */}}
{{- define "codefleet.mostReplicas" -}}
{{- if and .autoscaling .autoscaling.enabled }}{{ int .autoscaling.maxReplicas }}{{ else }}{{ int .replicas }}{{ end }}
{{- end }}

{{/* The preload marker's name for a model and revision (the engines' init container waits for it). */}}
{{- define "codefleet.preloadName" -}}
{{- $root := index . 0 }}{{- $m := index . 1 }}
{{- printf "%s-preload-%s" (include "codefleet.engineName" (list $root $m) | trunc 44 | trimSuffix "-") (printf "%s@%s" $m.model ($m.revision | default "main") | sha256sum | trunc 8) }}
{{- end }}

{{- define "codefleet.internalKeySecret" -}}
{{- default (printf "%s-internal-key" (include "codefleet.fullname" .)) .Values.internalKey.existingSecret }}
{{- end }}

{{- define "codefleet.apiKeySecret" -}}
{{- default (printf "%s-api-keys" (include "codefleet.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "codefleet.cacheClaim" -}}
{{- if eq .Values.modelCache.type "existingClaim" }}
{{- .Values.modelCache.existingClaim }}
{{- else }}
{{- printf "%s-model-cache" (include "codefleet.fullname" .) }}
{{- end }}
{{- end }}

{{/* The model-cache volume of an engine pod (or a preload Job), by modelCache.type. */}}
{{- define "codefleet.cacheVolume" -}}
{{- $root := index . 0 }}{{- $m := index . 1 }}{{- $c := $root.Values.modelCache }}
- name: model-cache
{{- if or (eq $c.type "shared") (eq $c.type "existingClaim") }}
  persistentVolumeClaim:
    claimName: {{ include "codefleet.cacheClaim" $root }}
{{- else if eq $c.type "perPod" }}
  # A ReadWriteOnce volume of the pod's own (generic ephemeral volume), deleted with the pod.
  ephemeral:
    volumeClaimTemplate:
      metadata:
        labels:
          {{- include "codefleet.selectorLabels" $root | nindent 10 }}
          app.kubernetes.io/component: model-cache
      spec:
        accessModes: [ReadWriteOnce]
        {{- with $c.storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ $c.perPodSize | default (printf "%dGi" (int ($m.cacheGiB | default 100))) }}
{{- else if eq $c.type "node" }}
  hostPath:
    path: {{ $c.hostPath }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: {{ printf "%dGi" (int ($m.cacheGiB | default 100)) }}
{{- end }}
{{- end }}
