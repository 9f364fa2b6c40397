{{/* Name of the release's objects: <release>-shoal, or the release name when it already contains "shoal". */}}
{{- define "shoal.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "shoal.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "controller"). */}}
{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shoal.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "shoal.controllerName" -}}{{ include "shoal.fullname" . }}-controller{{- end -}}
{{- define "shoal.nodeName" -}}{{ include "shoal.fullname" . }}-node{{- end -}}

{{- define "shoal.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "shoal.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{/* controller address the agents dial: the Service's cluster DNS name */}}
{{- define "shoal.controllerAddress" -}}
{{- printf "%s.%s.svc:%d" (include "shoal.controllerName" .) .Release.Namespace (int .Values.controller.port) -}}
{{- end -}}

{{/* the kubelet plugin directory of this driver */}}
{{- define "shoal.pluginDir" -}}
{{- printf "%s/plugins/%s" .Values.node.kubeletDir .Values.driverName -}}
{{- end -}}
