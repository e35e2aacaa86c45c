{{/*
Names, labels and the pieces every nanochat pod shares: the secure contexts, the writable emptyDirs,
the S3 and API-key environment, and the Ray pod template used by serving and training alike.
*/}}

{{- define "nanochat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
"<release>-<chart>" (or fullnameOverride), at most 38 characters: KubeRay refuses a RayJob name over 47 (its
RayCluster name, "<rayjob>-" plus 5 random characters, may be at most 53 so that "<cluster>-serve-svc" fits a
63-character Service name: MaxRayJobNameLength in ray-operator/controllers/ray/utils/constant.go), and the
chart's longest KubeRay name is "<fullname>-speedrun". A longer name is cut and ends in a hash of the whole, so
two long release names stay distinct. KubeRay names are DNS-1035 labels: dots become dashes, and the name must
start with a letter.
*/}}
{{- define "nanochat.fullname" -}}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- $full := .Values.fullnameOverride }}
{{- if not $full }}
{{- $full = contains $name .Release.Name | ternary .Release.Name (printf "%s-%s" .Release.Name $name) }}
{{- end }}
{{- $full = $full | lower | replace "." "-" }}
{{- if gt (len $full) 38 }}
{{- $full = printf "%s-%s" ($full | trunc 31 | trimSuffix "-") (sha256sum $full | trunc 6) }}
{{- end }}
{{- if not (regexMatch "^[a-z]" $full) }}
{{- fail (printf "the object names (%q) must start with a letter, as KubeRay's RayService and RayJob names are DNS-1035 labels: use a release name that does, or set fullnameOverride" $full) }}
{{- end }}
{{- $full }}
{{- end }}

{{- define "nanochat.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nanochat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nanochat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "nanochat.labels" -}}
helm.sh/chart: {{ include "nanochat.chart" . }}
{{ include "nanochat.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels of a pod template: the selector labels and the component, without the chart or app version. KubeRay
hashes a RayService's whole rayClusterConfig, pod labels included: a version label there would make every
chart bump roll out a second Ray cluster (a second set of GPUs with upgradeStrategy NewCluster).
Usage: (include "nanochat.podLabels" (list $ "serving"))
*/}}
{{- define "nanochat.podLabels" -}}
{{ include "nanochat.componentSelector" . }}
{{- end }}

{{/* Labels of one component (serving, training, minio, test): usage (include "nanochat.componentLabels" (list $ "serving")) */}}
{{- define "nanochat.componentLabels" -}}
{{ include "nanochat.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "nanochat.componentSelector" -}}
{{ include "nanochat.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "nanochat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nanochat.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "nanochat.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (eq .Values.image.variant "cuda" | ternary "-cuda" "")) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Storage root: storage.uri, or the bundled MinIO's bucket. */}}
{{- define "nanochat.storageUri" -}}
{{- if .Values.storage.uri }}
{{- .Values.storage.uri }}
{{- else if .Values.minio.enabled }}
{{- printf "s3://%s" .Values.minio.bucket }}
{{- else }}
{{- fail "storage.uri is required: set it to a bucket of yours (--set storage.uri=s3://BUCKET/PREFIX) or enable the bundled MinIO (--set minio.enabled=true)" }}
{{- end }}
{{- end }}

{{- define "nanochat.minioName" -}}
{{- printf "%s-minio" (include "nanochat.fullname" .) }}
{{- end }}

{{- define "nanochat.s3Endpoint" -}}
{{- if .Values.s3.endpoint }}
{{- .Values.s3.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "http://%s:9000" (include "nanochat.minioName" .) }}
{{- end }}
{{- end }}

{{/*
The Secret holding S3 credentials; empty when credentials come from workload identity. The chart's own is
"<fullname>-storage", never "nanochat-s3": that is the Secret k8s/speedrun-job.yaml tells its users to create.
*/}}
{{- define "nanochat.s3SecretName" -}}
{{- if .Values.s3.existingSecret }}
{{- .Values.s3.existingSecret }}
{{- else if or .Values.s3.accessKeyId .Values.s3.secretAccessKey .Values.minio.enabled }}
{{- printf "%s-storage" (include "nanochat.fullname" .) }}
{{- end }}
{{- end }}

{{- define "nanochat.apiKeysSecretName" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.keys }}
{{- printf "%s-api-keys" (include "nanochat.fullname" .) }}
{{- end }}
{{- end }}

{{- define "nanochat.apiKeysSecretKey" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecretKey }}{{ else }}NANOCHAT_API_KEYS{{ end }}
{{- end }}

{{/* The usual AWS variables; the nanochat code, boto3 and pyarrow all read them. */}}
{{- define "nanochat.s3Env" -}}
{{- $endpoint := include "nanochat.s3Endpoint" . }}
{{- if $endpoint }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ $endpoint | quote }}
{{- end }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
{{- with include "nanochat.s3SecretName" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretKeys.accessKeyId }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretKeys.secretAccessKey }}
{{- end }}
{{- end }}

{{- define "nanochat.apiKeysEnv" -}}
{{- with include "nanochat.apiKeysSecretName" . }}
- name: NANOCHAT_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "nanochat.apiKeysSecretKey" $ }}
{{- end }}
{{- end }}

{{/* Environment of every nanochat container: writable HOME and TMPDIR on the emptyDirs, storage, S3. */}}
{{- define "nanochat.env" -}}
- name: HOME
  value: /data
- name: TMPDIR
  value: /tmp
- name: NANOCHAT_STORAGE
  value: {{ include "nanochat.storageUri" . | quote }}
{{ include "nanochat.s3Env" . | trim }}
{{- end }}

{{- define "nanochat.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "nanochat.securityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end }}

{{/* The root filesystem is read-only: these are the only writable places. Usage: (list $ sharedMemorySize) */}}
{{- define "nanochat.volumes" -}}
- name: tmp
  emptyDir: {}
- name: data
  emptyDir: {}
{{- with index . 1 }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end }}
{{- end }}

{{- define "nanochat.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /data
{{- if index . 1 }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{/* Container resources plus nvidia.com/gpu (requests = limits, as extended resources require). Usage: (list resources gpus) */}}
{{- define "nanochat.resourcesWithGpus" -}}
{{- $res := deepCopy (index . 0) }}
{{- $gpus := int (index . 1) }}
{{- if gt $gpus 0 }}
{{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" $gpus) (default dict $res.requests)) }}
{{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $gpus) (default dict $res.limits)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
One Ray pod template (head or worker group). Usage:
  include "nanochat.rayPodTemplate" (dict "ctx" $ "component" "serving" "group" .Values.serving.head
                                          "head" true "gpus" 0 "extraEnv" list "apiKeys" true "autoscaler" true)
KubeRay adds the `ray start` command, its probes and the ray.io/* labels; the first container is Ray's.
*/}}
{{- define "nanochat.rayPodTemplate" }}
{{- $ := .ctx }}
{{- $ports := list (dict "name" "metrics" "containerPort" 8080) }}
{{- if eq .component "serving" }}
{{- $ports = append $ports (dict "name" "serve" "containerPort" 8000) }}
{{- end }}
{{- if .head }}
{{- $ports = concat (list (dict "name" "gcs-server" "containerPort" 6379) (dict "name" "dashboard" "containerPort" 8265) (dict "name" "client" "containerPort" 10001)) $ports }}
{{- end }}
metadata:
  labels:
    {{- include "nanochat.podLabels" (list $ .component) | nindent 4 }}
    nanochat.io/ray: "true"
spec:
  serviceAccountName: {{ include "nanochat.serviceAccountName" $ }}
  {{- /* the autoscaler sidecar on the head talks to the Kubernetes API with this token; nothing else needs it */}}
  automountServiceAccountToken: {{ and .head .autoscaler | ternary true false }}
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "nanochat.podSecurityContext" $ | nindent 4 }}
  containers:
    - name: {{ .head | ternary "ray-head" "ray-worker" }}
      image: {{ include "nanochat.image" $ }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      ports:
        {{- range $ports }}
        - name: {{ .name }}
          containerPort: {{ .containerPort }}
          protocol: TCP
        {{- end }}
      env:
        {{- include "nanochat.env" $ | nindent 8 }}
        {{- if and .apiKeys (include "nanochat.apiKeysSecretName" $) }}
        {{- include "nanochat.apiKeysEnv" $ | trim | nindent 8 }}
        {{- end }}
        {{- with .extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- include "nanochat.resourcesWithGpus" (list .group.resources .gpus) | nindent 8 }}
      securityContext:
        {{- include "nanochat.securityContext" $ | nindent 8 }}
      volumeMounts:
        {{- include "nanochat.volumeMounts" (list $ .group.sharedMemory) | nindent 8 }}
  volumes:
    {{- include "nanochat.volumes" (list $ .group.sharedMemory) | nindent 4 }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* rayStartParams: values are strings for KubeRay. Usage: (list defaults overrides) */}}
{{- define "nanochat.rayStartParams" -}}
{{- $params := dict }}
{{- range $k, $v := merge (dict) (index . 1) (index . 0) }}
{{- $_ := set $params $k (toString $v) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/* Ray cluster spec for training, shared by the RayCluster and the RayJob. */}}
{{- define "nanochat.trainingClusterSpec" -}}
{{- $t := .Values.training }}
rayVersion: {{ .Values.rayVersion | quote }}
authOptions:
  mode: {{ .Values.rayAuthMode }}
headGroupSpec:
  rayStartParams:
    {{- include "nanochat.rayStartParams" (list (dict "num-cpus" "0") $t.head.rayStartParams) | nindent 4 }}
  template:
    {{- include "nanochat.rayPodTemplate" (dict "ctx" . "component" "training" "group" $t.head "head" true "gpus" 0 "extraEnv" $t.extraEnv "apiKeys" false "autoscaler" false) | trim | nindent 4 }}
workerGroupSpecs:
  - groupName: {{ $t.workers.groupName }}
    replicas: {{ $t.workers.replicas }}
    minReplicas: {{ $t.workers.replicas }}
    maxReplicas: {{ $t.workers.replicas }}
    rayStartParams:
      {{- include "nanochat.rayStartParams" (list (dict) $t.workers.rayStartParams) | nindent 6 }}
    template:
      {{- include "nanochat.rayPodTemplate" (dict "ctx" . "component" "training" "group" $t.workers "head" false "gpus" $t.workers.gpus "extraEnv" $t.extraEnv "apiKeys" false "autoscaler" false) | trim | nindent 6 }}
{{- end }}

{{/* Every nanochat Ray pod in the namespace, of this release or of a k8s/ RayJob: what the monitors scrape. */}}
{{- define "nanochat.rayPodSelector" -}}
app.kubernetes.io/name: {{ include "nanochat.name" . }}
nanochat.io/ray: "true"
{{- end }}

{{/* The label that lets a pod outside the release (k8s/speedrun-job.yaml's) reach the bundled MinIO. */}}
{{- define "nanochat.storageClientLabel" -}}
nanochat.io/storage-client: "true"
{{- end }}
