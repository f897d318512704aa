{{- define "veil.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "veil.labels" -}}
app.kubernetes.io/part-of: veil
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "veil.caAddress" -}}
veil-ca.{{ .Release.Namespace }}.svc:15012
{{- end -}}
