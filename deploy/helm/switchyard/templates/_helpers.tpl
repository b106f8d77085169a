{{/* Labels of every object, and the selector labels of each component. */}}
{{- define "switchyard.labels" -}}
app.kubernetes.io/name: switchyard
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "switchyard.selector" -}}
app.kubernetes.io/name: switchyard
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "switchyard.fullname" -}}
{{- printf "%s-switchyard" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end }}

{{/* The pod security context: non-root, seccomp RuntimeDefault. */}}
{{- define "switchyard.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  fsGroup: 65532
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/* The container security context: read-only root, no privilege, no capability. */}}
{{- define "switchyard.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  capabilities:
    drop: ["ALL"]
{{- end }}

{{/* Environment every node shares: the config map, the store URL. */}}
{{- define "switchyard.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "switchyard.fullname" . }}-config
{{- end }}

{{- define "switchyard.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: SWITCHYARD_CLUSTER_CA
  value: /etc/switchyard/tls/ca.crt
- name: SWITCHYARD_CLUSTER_CERT
  value: /etc/switchyard/tls/tls.crt
- name: SWITCHYARD_CLUSTER_KEY
  value: /etc/switchyard/tls/tls.key
{{- end }}
{{- end }}

{{- define "switchyard.mounts" -}}
- name: secrets
  mountPath: /etc/switchyard/secrets
  readOnly: true
- name: config
  mountPath: /etc/switchyard/config
  readOnly: true
- name: data
  mountPath: /var/lib/switchyard
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/switchyard/tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "switchyard.volumes" -}}
- name: secrets
  secret:
    secretName: {{ .Values.secrets.name }}
    defaultMode: 0440
- name: config
  configMap:
    name: {{ include "switchyard.fullname" . }}-config
    items:
      - key: agents.toml
        path: agents.toml
- name: data
  emptyDir: {}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}
