{{- define "fleetproxy.labels" -}}
app.kubernetes.io/part-of: fleetproxy
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "fleetproxy.operatorSelector" -}}
app.kubernetes.io/name: fleetproxy-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fleetproxy.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "fleetproxy.operatorName" -}}
{{ .Release.Name }}-operator
{{- end }}

{{- define "fleetproxy.agentName" -}}
{{ .Release.Name }}-agent
{{- end }}

{{/* The port of operator.metricsBindAddress (host:port or [v6]:port). */}}
{{- define "fleetproxy.operatorPort" -}}
{{ .Values.operator.metricsBindAddress | splitList ":" | last | int }}
{{- end }}
