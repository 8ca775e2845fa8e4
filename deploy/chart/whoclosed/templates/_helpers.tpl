{{- define "whoclosed.labels" -}}
app.kubernetes.io/name: whoclosed
{{- end -}}
