{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: `<release>-<chart>` unless the release name already contains the chart name.
Truncated to 52 characters so suffixed names (`-standby`, `-kopf-observer`) stay valid DNS labels.
*/}}
{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "kiln.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "kiln.labels" -}}
helm.sh/chart: {{ include "kiln.chart" . }}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kiln
{{- end }}

{{/*
Selector labels (stable across upgrades: never add to these).
*/}}
{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag} (tag defaults to the appVersion) and an optional digest.
Usage: include "kiln.image" (dict "image" .Values.image "context" $)
*/}}
{{- define "kiln.image" -}}
{{- $tag := default .context.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Cross-field checks the values schema cannot express well; fail with a clear message.
*/}}
{{- define "kiln.validate" -}}
{{- if and (eq .Values.scope "namespaced") (not .Values.watchNamespaces) }}
{{- fail "scope=namespaced needs at least one namespace in watchNamespaces" }}
{{- end }}
{{- if eq .Values.scope "namespaced" }}
{{- range .Values.watchNamespaces }}
{{- if or (contains "*" .) (contains "?" .) }}
{{- fail (printf "scope=namespaced needs exact namespace names (a Role is created in each); %q is a glob: use scope=cluster for globs" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.standby.enabled (not .Values.peering.enabled) }}
{{- fail "standby.enabled needs peering.enabled=true (Kopf peering decides which replica is active)" }}
{{- end }}
{{- if and .Values.standby.enabled (ge (int .Values.standby.priority) (int .Values.peering.priority)) }}
{{- fail "standby.priority must be lower than peering.priority (replicas of equal priority all pause)" }}
{{- end }}
{{- if le (int .Values.operator.watchClientTimeout) (int .Values.operator.watchServerTimeout) }}
{{- fail "operator.watchClientTimeout must be greater than operator.watchServerTimeout" }}
{{- end }}
{{- end }}

{{/*
RBAC rules the operator needs in every namespace it serves: used by the ClusterRole (scope=cluster)
and by the Role in each watched namespace (scope=namespaced). Least privilege: explicit verbs only.
See docs/install.md for why each rule exists.
*/}}
{{- define "kiln.namespacedRules" -}}
# The admin's policy: the Namespace's kiln.dev/policy-profile label (get on the namespace itself).
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get"]
{{- $p := .Values.policy }}
{{- $pvcSel := or (and $p.pvcs $p.pvcs.selector) false }}
{{- $secretSel := or (and $p.secrets $p.secrets.selector) false }}
{{- range $name, $prof := ($p.namespaceProfiles | default dict) }}
{{- if and $prof.pvcs $prof.pvcs.selector }}{{ $pvcSel = true }}{{ end }}
{{- if and $prof.secrets $prof.secrets.selector }}{{ $secretSel = true }}{{ end }}
{{- end }}
{{- if $pvcSel }}
# The policy admits PVCs by label: the operator reads the labels of the claims a spec names.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
{{- end }}
{{- if $secretSel }}
# The policy admits Secrets by label (policy.secrets.selector): the operator reads the Secrets a spec names.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
# TrainingJobs: Kopf watches them and patches its bookkeeping annotations onto them.
- apiGroups: ["kiln.dev"]
  resources: ["trainingjobs"]
  verbs: ["get", "list", "watch", "patch"]
# ModelDeployments: watched; created from a TrainingJob's spec.deploy (409 -> read back).
- apiGroups: ["kiln.dev"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch", "create"]
# Status subresources: the operator writes phase/conditions/result. It also grants each trainer
# get+patch on its own TrainingJob's status, which RBAC only allows if the operator holds both verbs.
- apiGroups: ["kiln.dev"]
  resources: ["trainingjobs/status", "modeldeployments/status"]
  verbs: ["get", "patch"]
# Children carry ownerReferences with blockOwnerDeletion: clusters with the
# OwnerReferencesPermissionEnforcement admission plugin require update on the owner's finalizers.
- apiGroups: ["kiln.dev"]
  resources: ["trainingjobs/finalizers", "modeldeployments/finalizers"]
  verbs: ["update"]
# Training Jobs: created, watched, deleted after a start timeout, patched to suspend/resume.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Trainer and server Pods: watched to explain what happens (image pull errors, OOM, GPU waits).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# The trainer's per-job ServiceAccount: created once (409 -> read back).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create"]
# Headless Service of multi-worker jobs (created once); model server Services (watched, server-side applied;
# a canary's per-track Services are deleted when spec.service.gateway or spec.canary goes).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The trainer's per-job Role and RoleBinding (get+patch on its own TrainingJob's status only).
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create"]
# Model server Deployments: watched, kept by server-side apply (an apply PATCH that creates the
# object is authorized for both patch and create); a canary's Deployment is deleted on rollback or promotion.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# spec.service.gateway: the model's Gateway API HTTPRoute (server-side applied, deleted when the field goes).
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["create", "patch", "delete"]
{{- if .Values.networkPolicies.enabled }}
# Who may reach each model server: a NetworkPolicy per ModelDeployment (server-side applied).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
{{- end }}
# Model server autoscaling: server-side applied (create+patch), deleted when autoscaling is turned off.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["create", "patch", "delete"]
# Transition events on TrainingJobs and ModelDeployments (Kopf posts core/v1 Events).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if and .Values.peering.enabled .Values.watchNamespaces }}
# Kopf peering (operators serving listed namespaces): keep-alives in the KopfPeering of each namespace.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/*
Rules only a cluster-scoped operator needs.
*/}}
{{- define "kiln.clusterRules" -}}
# Kopf notices CRDs installed or removed while it runs (read-only).
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watchNamespaces }}
# Namespace globs in watchNamespaces: Kopf follows namespaces appearing and disappearing.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- if and .Values.peering.enabled (not .Values.watchNamespaces) }}
# Kopf peering (cluster-wide operators): keep-alives in the ClusterKopfPeering.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/*
"true" when watchNamespaces holds a glob (`team-*`): RoleBindings cannot follow namespaces that appear later.
*/}}
{{- define "kiln.hasGlobs" -}}
{{- range .Values.watchNamespaces }}{{ if regexMatch "[*?\\[]" . }}true{{ end }}{{ end }}
{{- end }}
