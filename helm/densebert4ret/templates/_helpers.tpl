{{/*
Chart name, or nameOverride when set.
*/}}
{{- define "densebert4ret.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every resource name: fullnameOverride when set, otherwise the
release name, followed by the chart name unless the release name already
contains it. Names are cut to 63 characters, the limit of a DNS label such
as a Service name.
*/}}
{{- define "densebert4ret.fullname" -}}
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
Name of one component's resources: the prefix, shortened so that
"<prefix>-<component>" fits in `limit` characters, then the component.
Takes a dict with root, component and limit.
*/}}
{{- define "densebert4ret.componentFullname" -}}
{{- $prefixLimit := sub (int .limit) (add1 (len .component)) }}
{{- $prefix := include "densebert4ret.fullname" .root | trunc (int $prefixLimit) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix .component }}
{{- end }}

{{- define "densebert4ret.gateway.fullname" -}}
{{- include "densebert4ret.componentFullname" (dict "root" . "component" "gateway" "limit" 63) }}
{{- end }}

{{- define "densebert4ret.encoder.fullname" -}}
{{- include "densebert4ret.componentFullname" (dict "root" . "component" "encoder" "limit" 63) }}
{{- end }}

{{/*
StatefulSet name of the index shards. The StatefulSet controller adds a
controller-revision-hash label of "<name>-<hash>" to every pod, and label
values are at most 63 characters, so the name is kept to 52.
*/}}
{{- define "densebert4ret.index.fullname" -}}
{{- include "densebert4ret.componentFullname" (dict "root" . "component" "index" "limit" 52) }}
{{- end }}

{{/*
Headless Service that gives shard i the DNS name
"<index fullname>-<i>.<index headless name>".
*/}}
{{- define "densebert4ret.index.headlessName" -}}
{{- printf "%s-headless" (include "densebert4ret.index.fullname" .) }}
{{- end }}

{{/*
ENCODER__DEVICE: encoder.device when set, otherwise "cuda" with a GPU and
"cpu" without one.
*/}}
{{- define "densebert4ret.encoder.device" -}}
{{- .Values.encoder.device | default (ternary "cuda" "cpu" .Values.encoder.gpu.enabled) }}
{{- end }}

{{/*
Name of the encoder's model claim when the chart creates it.
*/}}
{{- define "densebert4ret.encoder.modelClaimName" -}}
{{- printf "%s-model" (include "densebert4ret.encoder.fullname" .) }}
{{- end }}

{{/*
Value of the helm.sh/chart label.
*/}}
{{- define "densebert4ret.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select one component's pods. Takes a dict with root and
component. Selectors are immutable, so this set must never change.
*/}}
{{- define "densebert4ret.selectorLabels" -}}
app.kubernetes.io/name: {{ include "densebert4ret.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of every resource of one component. Takes a dict with root and
component.
*/}}
{{- define "densebert4ret.labels" -}}
helm.sh/chart: {{ include "densebert4ret.chart" .root }}
{{ include "densebert4ret.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | replace "+" "_" | quote }}
app.kubernetes.io/part-of: {{ include "densebert4ret.name" .root }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Name of the ServiceAccount that the pods run as.
*/}}
{{- define "densebert4ret.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "densebert4ret.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference of one component: its own repository, tag or digest where
set, otherwise the chart-wide image. A digest takes precedence over a tag.
Takes a dict with root and image (the component's image values).
*/}}
{{- define "densebert4ret.image" -}}
{{- $global := .root.Values.image }}
{{- $own := .image | default dict }}
{{- $repository := $own.repository | default $global.repository }}
{{- $digest := $own.digest | default $global.digest }}
{{- $tag := $own.tag | default $global.tag | default .root.Chart.AppVersion }}
{{- if $digest }}
{{- printf "%s@%s" $repository $digest }}
{{- else }}
{{- printf "%s:%s" $repository (toString $tag) }}
{{- end }}
{{- end }}

{{/*
Image pull policy of one component. Takes the same dict as
densebert4ret.image.
*/}}
{{- define "densebert4ret.imagePullPolicy" -}}
{{- $own := .image | default dict }}
{{- $own.pullPolicy | default .root.Values.image.pullPolicy }}
{{- end }}

{{/*
"<host>:<port>" that a service binds. Takes a dict with root and port.
*/}}
{{- define "densebert4ret.listenAddress" -}}
{{- printf "%s:%d" .root.Values.listenHost (int .port) }}
{{- end }}

{{/*
Pod spec fields that every component shares. No service uses the
service-link variables that Kubernetes would add for every Service in the
namespace, so they are kept out of the environment that the services read
their settings from.
*/}}
{{- define "densebert4ret.podCommon" -}}
serviceAccountName: {{ include "densebert4ret.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Scheduling fields of one component's pods. Takes the component's values.
*/}}
{{- define "densebert4ret.podScheduling" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Pod template metadata of one component. Takes a dict with root, component
and values (the component's values).
*/}}
{{- define "densebert4ret.podMetadata" -}}
labels:
  {{- include "densebert4ret.labels" . | nindent 2 }}
  {{- with .values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Environment variables that every container gets: logging settings, and a
HOME on the writable /tmp, because the root file system is read-only and
libraries such as CUDA keep caches under $HOME. Takes a dict with root and
values (the component's values).
*/}}
{{- define "densebert4ret.commonEnv" -}}
- name: HOME
  value: /tmp
- name: RUST_LOG
  value: {{ .values.logLevel | default .root.Values.logging.level | quote }}
- name: LOG_FORMAT
  value: {{ .root.Values.logging.format | quote }}
{{- end }}

{{/*
gRPC probe against the standard grpc.health.v1 service. An empty service
name checks the server as a whole. Takes a dict with port, service and
timing (periodSeconds and the other probe timing fields).
*/}}
{{- define "densebert4ret.grpcProbe" -}}
grpc:
  port: {{ int .port }}
  {{- with .service }}
  service: {{ . | quote }}
  {{- end }}
{{- with .timing }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The three probes of one container: the startup and readiness probes wait for
the component's own health service name to report SERVING, and the liveness
probe only checks that the server answers. Takes a dict with values (the
component's values) and service.
*/}}
{{- define "densebert4ret.probes" -}}
startupProbe:
  {{- include "densebert4ret.grpcProbe" (dict "port" .values.port "service" .service "timing" .values.probes.startup) | nindent 2 }}
readinessProbe:
  {{- include "densebert4ret.grpcProbe" (dict "port" .values.port "service" .service "timing" .values.probes.readiness) | nindent 2 }}
livenessProbe:
  {{- include "densebert4ret.grpcProbe" (dict "port" .values.port "service" "" "timing" .values.probes.liveness) | nindent 2 }}
{{- end }}

{{/*
Volumes that every pod has: a writable /tmp, because the root file system is
read-only by default.
*/}}
{{- define "densebert4ret.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "densebert4ret.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
storageClassName field of a claim: omitted when empty, so the cluster's
default StorageClass applies, and "" when set to "-", which disables
dynamic provisioning.
*/}}
{{- define "densebert4ret.storageClassName" -}}
{{- if eq . "-" }}
storageClassName: ""
{{- else if . }}
storageClassName: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
PodDisruptionBudget spec of one component. minAvailable is used when set,
otherwise maxUnavailable. Takes a dict with root, component and budget (the
component's podDisruptionBudget values).
*/}}
{{- define "densebert4ret.pdbSpec" -}}
{{- $min := .budget.minAvailable }}
{{- $max := .budget.maxUnavailable }}
{{- if and (not (kindIs "invalid" $min)) (ne (toString $min) "") }}
minAvailable: {{ include "densebert4ret.intOrPercent" $min }}
{{- else if and (not (kindIs "invalid" $max)) (ne (toString $max) "") }}
maxUnavailable: {{ include "densebert4ret.intOrPercent" $max }}
{{- else }}
{{- fail (printf "%s.podDisruptionBudget: set minAvailable or maxUnavailable, or set enabled to false" .component) }}
{{- end }}
selector:
  matchLabels:
    {{- include "densebert4ret.selectorLabels" . | nindent 4 }}
{{- end }}

{{/*
An integer or a percentage string such as "50%", as the PodDisruptionBudget
fields expect. Helm reads numbers in values as floats, so integers are
converted back.
*/}}
{{- define "densebert4ret.intOrPercent" -}}
{{- if kindIs "string" . }}
{{- . | quote }}
{{- else }}
{{- int . }}
{{- end }}
{{- end }}

{{/*
GATEWAY__SHARDS: the URL of every index shard, shard 0 first, through the
per-pod DNS names of the headless Service.
*/}}
{{- define "densebert4ret.index.shardUrls" -}}
{{- $statefulSet := include "densebert4ret.index.fullname" . }}
{{- $headless := include "densebert4ret.index.headlessName" . }}
{{- $port := int .Values.index.port }}
{{- $urls := list }}
{{- range $shard := until (int .Values.index.shards) }}
{{- $urls = append $urls (printf "http://%s-%d.%s:%d" $statefulSet $shard $headless $port) }}
{{- end }}
{{- join "," $urls }}
{{- end }}
