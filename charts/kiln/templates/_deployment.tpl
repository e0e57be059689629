{{/*
One operator Deployment. Called with (dict "root" $ "suffix" "" "priority" 100 "role" "active").
*/}}
{{- define "kiln.operatorDeployment" -}}
{{- $ := .root }}
{{- $values := $.Values }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "kiln.fullname" $ }}{{ .suffix }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "kiln.labels" $ | nindent 4 }}
    kiln.dev/operator-role: {{ .role }}
spec:
  # One replica per Deployment: two operators of equal Kopf priority would both pause.
  # A standby replica is a second Deployment with a lower priority (standby.enabled).
  replicas: 1
  # Never two operators of one Deployment at once (same priority, or no peering at all).
  strategy:
    type: Recreate
  selector:
    matchLabels:
      {{- include "kiln.selectorLabels" $ | nindent 6 }}
      kiln.dev/operator-role: {{ .role }}
  template:
    metadata:
      labels:
        {{- include "kiln.selectorLabels" $ | nindent 8 }}
        kiln.dev/operator-role: {{ .role }}
        {{- with $values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "kiln.serviceAccountName" $ }}
      automountServiceAccountToken: true
      {{- with $values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        fsGroup: 65532
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: operator
          image: {{ include "kiln.image" (dict "image" $values.image "context" $) | quote }}
          imagePullPolicy: {{ $values.image.pullPolicy }}
          {{- with include "kiln.operatorArgs" $ | trim }}
          args:
            {{- . | nindent 12 }}
          {{- end }}
          env:
            {{- include "kiln.operatorEnv" (dict "root" $ "priority" .priority) | trim | nindent 12 }}
          ports:
            - name: health
              containerPort: {{ $values.operator.healthPort }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $values.operator.metricsPort }}
              protocol: TCP
          livenessProbe:
            httpGet:
              path: /healthz
              port: health
            {{- toYaml $values.livenessProbe | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /healthz
              port: health
            {{- toYaml $values.readinessProbe | nindent 12 }}
          {{- with $values.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            allowPrivilegeEscalation: false
            privileged: false
            readOnlyRootFilesystem: true
            runAsNonRoot: true
            runAsUser: 65532
            runAsGroup: 65532
            capabilities:
              drop: ["ALL"]
            seccompProfile:
              type: RuntimeDefault
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: tmp
          emptyDir:
            {{- with $values.tmpSizeLimit }}
            sizeLimit: {{ . }}
            {{- end }}
      {{- with $values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/*
Command-line flags of `kiln operator` (the image's ENTRYPOINT is ["kiln", "operator"]).
*/}}
{{- define "kiln.operatorArgs" -}}
{{- if and (eq .Values.scope "cluster") (not .Values.watchNamespaces) }}
- --all-namespaces
{{- end }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- end }}

{{/*
Environment of `kiln operator`: every setting as KILN_<FIELD> (operator/kiln_operator/settings.py).
*/}}
{{- define "kiln.operatorEnv" -}}
{{- $values := .root.Values }}
- name: KILN_NAMESPACES
  value: {{ join "," $values.watchNamespaces | quote }}
- name: KILN_TRAINER_IMAGE
  value: {{ include "kiln.image" (dict "image" $values.trainer.image "context" .root) | quote }}
- name: KILN_SERVER_IMAGE
  value: {{ include "kiln.image" (dict "image" $values.server.image "context" .root) | quote }}
- name: KILN_SERVER_GPU_IMAGE
  value: {{ if $values.server.gpuImage.repository }}{{ include "kiln.image" (dict "image" $values.server.gpuImage "context" .root) | quote }}{{ else }}""{{ end }}
- name: KILN_IMAGE_PULL_POLICY
  value: {{ $values.workloadImagePullPolicy | quote }}
- name: KILN_RECONCILE_INTERVAL
  value: {{ $values.operator.reconcileInterval | toString | quote }}
- name: KILN_TRIAL_MODE
  value: {{ $values.operator.trialMode | quote }}
- name: KILN_WATCH_SERVER_TIMEOUT
  value: {{ $values.operator.watchServerTimeout | int | toString | quote }}
- name: KILN_WATCH_CLIENT_TIMEOUT
  value: {{ $values.operator.watchClientTimeout | int | toString | quote }}
- name: KILN_REQUEST_TIMEOUT
  value: {{ $values.operator.requestTimeout | toString | quote }}
- name: KILN_LIVENESS
  value: {{ printf "http://0.0.0.0:%d/healthz" (int $values.operator.healthPort) | quote }}
- name: KILN_PEERING
  value: {{ ternary $values.peering.name "" $values.peering.enabled | quote }}
- name: KILN_PRIORITY
  value: {{ .priority | int | toString | quote }}
- name: KILN_NETWORK_POLICIES
  value: {{ $values.networkPolicies.enabled | toString | quote }}
- name: KILN_TRAINER_EGRESS
  value: {{ join "," $values.networkPolicies.trainerEgress | quote }}
- name: KILN_POLICY
  value: {{ $values.policy | toJson | quote }}
- name: KILN_PEERING_LIFETIME
  value: {{ $values.peering.lifetime | int | toString | quote }}
- name: KILN_METRICS_PORT
  value: {{ $values.operator.metricsPort | int | toString | quote }}
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}
