{{/* Names and labels. */}}
{{- define "tierserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tierserve.fullname" -}}
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

{{- define "tierserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tierserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tierserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tierserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Ray (the RayService, its pods and the Serve service). Kept under 48 chars: KubeRay derives
     "<name>-raycluster-xxxxx-head-svc"-style names from it. */}}
{{- define "tierserve.rayName" -}}
{{- include "tierserve.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "tierserve.serveServiceName" -}}
{{- printf "%s-serve" (include "tierserve.rayName" .) }}
{{- end }}

{{/* Selects the release's Ray pods (head and workers, of every RayCluster KubeRay makes for the RayService). */}}
{{- define "tierserve.rayPodSelector" -}}
matchLabels:
  {{- include "tierserve.selectorLabels" . | nindent 2 }}
matchExpressions:
  - {key: app.kubernetes.io/component, operator: In, values: [ray-head, ray-worker]}
{{- end }}

{{- define "tierserve.serveServiceLabels" -}}
{{ include "tierserve.selectorLabels" . }}
app.kubernetes.io/component: serve
{{- end }}

{{- define "tierserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{/* Qdrant. */}}
{{- define "tierserve.qdrantName" -}}
{{- printf "%s-qdrant" (include "tierserve.fullname" . | trunc 50 | trimSuffix "-") }}
{{- end }}

{{- define "tierserve.qdrantSelectorLabels" -}}
{{ include "tierserve.selectorLabels" . }}
app.kubernetes.io/component: qdrant
{{- end }}

{{/* The Qdrant HTTP URL the router should use; empty when there is none. */}}
{{- define "tierserve.qdrantUrl" -}}
{{- if .Values.qdrant.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "tierserve.qdrantName" .) .Release.Namespace (int .Values.qdrant.httpPort) }}
{{- else }}
{{- .Values.qdrant.externalUrl }}
{{- end }}
{{- end }}

{{/* The tierserve YAML: tierserve.configYaml or tierserve.config, plus router.store.url when the
     config names no store of its own (neither store.url nor an embedded store.path). */}}
{{- define "tierserve.config" -}}
{{- $cfg := dict }}
{{- if .Values.tierserve.configYaml }}
{{- $cfg = fromYaml .Values.tierserve.configYaml }}
{{- if hasKey $cfg "Error" }}
{{- fail (printf "tierserve.configYaml is not valid YAML: %s" (get $cfg "Error")) }}
{{- end }}
{{- else }}
{{- $cfg = deepCopy (.Values.tierserve.config | default dict) }}
{{- end }}
{{- if not $cfg.tiers }}
{{- fail "tierserve.config (or tierserve.configYaml) must list at least one tier under `tiers:`." }}
{{- end }}
{{- $url := include "tierserve.qdrantUrl" . }}
{{- if and .Values.tierserve.injectQdrantUrl $url }}
{{- $router := $cfg.router | default dict }}
{{- $store := $router.store | default dict }}
{{- if not (or $store.url $store.path) }}
{{- $_ := set $store "url" $url }}
{{- end }}
{{- $_ := set $router "store" $store }}
{{- $_ := set $cfg "router" $router }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{- define "tierserve.configPath" -}}
{{- printf "%s/tierserve.yaml" (.Values.tierserve.mountPath | trimSuffix "/") }}
{{- end }}

{{/* The Ray Serve config (serveConfigV2): one application built by serving.app:app_builder. */}}
{{- define "tierserve.serveConfig" -}}
{{- $app := dict "name" "tierserve" "route_prefix" "/" "import_path" "serving.app:app_builder" "args" (dict "config" (include "tierserve.configPath" .)) }}
{{- $cfg := include "tierserve.config" . | fromYaml }}
{{- $timeout := add (int ((($cfg.http | default dict).request_timeout_s) | default 300)) 5 }}
{{- $http := dict "host" "0.0.0.0" "port" (int .Values.serve.port) "request_timeout_s" $timeout }}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $http "applications" (list $app)) }}
{{- end }}

{{- define "tierserve.apiKeySecretName" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if or .Values.apiKeys.keys .Values.apiKeys.adminKeys }}
{{- printf "%s-api-keys" (include "tierserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* Env shared by the head and worker containers. RAY_SERVE_ENABLE_HA_PROXY: Ray Serve's HAProxy ingress on
     every node (the mode `tierserve up` runs too): HAProxy on the serve port forwards to each ingress replica's
     own HTTP server and answers KubeRay's /-/healthz; no Python proxy hop per streamed chunk. RAY_worker_niceness:
     the serving processes (ingress, tier replicas, engines) at nice 0, not Ray's 15 for workers. */}}
{{- define "tierserve.env" -}}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_worker_niceness
  value: "0"
- name: TIERSERVE_DATA_DIR
  value: {{ .Values.data.mountPath | quote }}
{{- with include "tierserve.apiKeySecretName" . }}
- name: TIERSERVE_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.apiKeys.secretKey }}
      optional: true
- name: TIERSERVE_ADMIN_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.apiKeys.adminSecretKey }}
      optional: true
{{- end }}
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* RAY_SERVE_HAPROXY_NBTHREAD for one Ray container: half its CPU request, 1 to 4 threads, as `tierserve up`
     sets it (serving/launch.py `haproxy_threads`). Ray starts 4 whatever the pod has, and threads beyond the
     cores HAProxy gets are context switches the engines pay for (measured on 2 cores at 32 streams: 4 threads
     took 23-26 ms of CPU per 1,000 streamed tokens, 1 thread 13-16 ms). `env.RAY_SERVE_HAPROXY_NBTHREAD` wins.
     Pass (dict "root" $ "cpu" <the container's resources.requests.cpu>). */}}
{{- define "tierserve.haproxyEnv" -}}
{{- if not (hasKey (.root.Values.env | default dict) "RAY_SERVE_HAPROXY_NBTHREAD") }}
{{- $cpu := toString (.cpu | default "2") }}
{{- $millis := 0 }}
{{- if hasSuffix "m" $cpu }}
{{- $millis = trimSuffix "m" $cpu | atoi }}
{{- else }}
{{- $millis = mulf (float64 $cpu) 1000 | int }}
{{- end }}
- name: RAY_SERVE_HAPROXY_NBTHREAD
  value: {{ max 1 (min 4 (div $millis 2000)) | quote }}
{{- end }}
{{- end }}

{{/* Volumes shared by the head and worker pods; pass (dict "root" $ "models" bool). */}}
{{- define "tierserve.volumes" -}}
{{- $v := .root.Values -}}
- name: tierserve-config
  configMap:
    name: {{ include "tierserve.fullname" .root }}-config
    items:
      - key: tierserve.yaml
        path: tierserve.yaml
- name: data
{{ toYaml $v.data.volume | indent 2 }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.shm.sizeLimit }}
{{- range $i, $path := $v.securityContext.ray.writablePaths }}
- name: writable-{{ $i }}
  emptyDir: {}
{{- end }}
{{- if .models }}
- name: models
{{ toYaml $v.models.volume | indent 2 }}
{{- end }}
{{- end }}

{{- define "tierserve.volumeMounts" -}}
{{- $v := .root.Values -}}
- name: tierserve-config
  mountPath: {{ $v.tierserve.mountPath }}
  readOnly: true
- name: data
  mountPath: {{ $v.data.mountPath }}
- name: dshm
  mountPath: /dev/shm
{{- range $i, $path := $v.securityContext.ray.writablePaths }}
- name: writable-{{ $i }}
  mountPath: {{ $path }}
{{- end }}
{{- if .models }}
- name: models
  mountPath: {{ $v.models.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Fail early on values KubeRay or Ray would reject later. */}}
{{- define "tierserve.validate" -}}
{{- $w := .Values.workers }}
{{- if gt (int $w.minReplicas) (int $w.maxReplicas) }}
{{- fail (printf "workers.minReplicas (%d) cannot be greater than workers.maxReplicas (%d)." (int $w.minReplicas) (int $w.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "workers.replicas (%d) must lie within workers.minReplicas..maxReplicas (%d..%d)." (int $w.replicas) (int $w.minReplicas) (int $w.maxReplicas)) }}
{{- end }}
{{- if lt (int .Values.gpu.count) 1 }}
{{- fail (printf "gpu.count (%v) must be at least 1: the engines need a GPU per worker pod." .Values.gpu.count) }}
{{- end }}
{{- if not (has .Values.upgradeStrategy (list "NewCluster" "None" "NewClusterWithIncrementalUpgrade")) }}
{{- fail (printf "upgradeStrategy (%v) must be NewCluster, None or NewClusterWithIncrementalUpgrade." .Values.upgradeStrategy) }}
{{- end }}
{{- $pdb := .Values.qdrant.podDisruptionBudget }}
{{- if and .Values.qdrant.enabled $pdb.enabled (eq (hasKey $pdb "minAvailable") (hasKey $pdb "maxUnavailable")) }}
{{- fail "qdrant.podDisruptionBudget: set exactly one of minAvailable and maxUnavailable (to drop the default minAvailable, set it to null)." }}
{{- end }}
{{- end }}

{{/* rayStartParams: Ray wants every value as a string. */}}
{{- define "tierserve.rayStartParams" -}}
{{- $params := dict }}
{{- range $k, $v := . }}
{{- $_ := set $params $k (toString $v) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/* Worker resources with the GPU added to both requests and limits (extended resources need both equal). */}}
{{- define "tierserve.workerResources" -}}
{{- $gpus := toString .Values.gpu.count }}
{{- $requests := deepCopy (.Values.workers.resources.requests | default dict) }}
{{- $limits := deepCopy (.Values.workers.resources.limits | default dict) }}
{{- $_ := set $requests .Values.gpu.resourceName $gpus }}
{{- $_ := set $limits .Values.gpu.resourceName $gpus }}
{{- toYaml (dict "requests" $requests "limits" $limits) }}
{{- end }}

{{/* PromQL label matchers for this release's series: alerts.selector, or the job and namespace the
     ServiceMonitor gives them (job = the Serve Service's name). */}}
{{- define "tierserve.alertSelector" -}}
{{- if .Values.alerts.selector }}
{{- .Values.alerts.selector }}
{{- else }}
{{- printf "job=%q, namespace=%q" (include "tierserve.serveServiceName" .) .Release.Namespace }}
{{- end }}
{{- end }}
