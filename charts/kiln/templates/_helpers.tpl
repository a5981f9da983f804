{{/*
The chart name, or nameOverride.
*/}}
{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the operator's objects: fullnameOverride, else the release name when it already
contains the chart name, else "<release>-<chart>". Truncated to the 63 characters DNS names allow.
*/}}
{{- define "kiln.fullname" -}}
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

{{/*
chart-version, as the helm.sh/chart label wants it.
*/}}
{{- define "kiln.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels every object carries.
*/}}
{{- define "kiln.labels" -}}
helm.sh/chart: {{ include "kiln.chart" . }}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kiln
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels that select the operator's pods.
*/}}
{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels the operator puts on trainer and serving pods (kiln_operator builders), for selecting them.
*/}}
{{- define "kiln.workloadSelectorLabels" -}}
app.kubernetes.io/name: kiln
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {registry, repository, tag}: the registry falls back to global.imageRegistry,
the tag to the chart's appVersion. Call with (dict "image" .Values.x.image "context" $).
*/}}
{{- define "kiln.image" -}}
{{- $registry := .image.registry | default .context.Values.global.imageRegistry }}
{{- $tag := .image.tag | default .context.Chart.AppVersion }}
{{- if $registry }}
{{- printf "%s/%s:%s" $registry .image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/*
The names in workloads.imagePullSecrets, comma-separated, as KILN_IMAGE_PULL_SECRETS wants them.
*/}}
{{- define "kiln.workloadPullSecrets" -}}
{{- $names := list }}
{{- range .Values.workloads.imagePullSecrets }}
{{- $names = append $names .name }}
{{- end }}
{{- join "," $names }}
{{- end }}

{{/*
Namespaces holding the per-namespace objects TrainingJobs use: workloadNamespaces, else watchNamespaces,
else "default". Rendered as a YAML list; read it back with fromYamlArray.
*/}}
{{- define "kiln.workloadNamespaces" -}}
{{- $namespaces := .Values.workloadNamespaces | default .Values.watchNamespaces | default (list "default") }}
{{- toYaml (uniq $namespaces) }}
{{- end }}

{{/*
Whether a monitoring.coreos.com/v1 object should render: enabled, and the API exists or force is set.
Call with (dict "config" .Values.metrics.serviceMonitor "context" $); prints "true" or nothing.
*/}}
{{- define "kiln.monitoringEnabled" -}}
{{- if and .config.enabled (or .config.force (.context.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
true
{{- end }}
{{- end }}

{{/*
What the operator may do inside a namespace it watches: the rules of a ClusterRole bound cluster-wide
(all namespaces) or of a Role in each watched namespace. No Secrets, no wildcards.
*/}}
{{- define "kiln.operatorRules" -}}
# Exactly the verbs the operator's calls need, call by call in operator/kiln_operator/permissions.py
# (a unit test keeps these equal). TrainingJobs: read, watched, the operator's finalizer (retention Delete).
- apiGroups: ["kiln.dev"]
  resources: ["trainingjobs"]
  verbs: ["get", "list", "watch", "patch"]
# Status writes; get too because the trainer's Role grants it (an operator grants only what it holds).
- apiGroups: ["kiln.dev"]
  resources: ["trainingjobs/status"]
  verbs: ["get", "patch"]
# Children carry owner references with blockOwnerDeletion, which OwnerReferencesPermissionEnforcement
# allows only to who may update the owner's finalizers.
- apiGroups: ["kiln.dev"]
  resources: ["trainingjobs/finalizers"]
  verbs: ["update"]
# The trainer's identity and role: created, and watched so one deleted by hand is re-created.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["list", "watch", "create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["list", "watch", "create"]
# The headless (DDP) Service is created; the serving Service is applied and removed with serving; both watched.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# The trainer Job (and the artifacts cleanup Job): read, watched, created, patched (suspend, runPolicy).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The serving Deployment: read, watched, created or applied, removed when serving is disabled.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The serving PodDisruptionBudget (more than one replica): applied, removed when no longer needed.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["patch", "delete"]
{{- if .Values.workloads.serving.autoscaling.enabled }}
# The serving HPA: applied, or removed when a job no longer autoscales.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["patch", "delete"]
{{- end }}
# Trainer and serving pods, listed and watched to report progress and failures.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Events on TrainingJobs (kopf posts them through the core API).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
