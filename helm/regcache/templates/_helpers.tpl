{{/* Names and labels. */}}
{{- define "regcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "regcache.fullname" -}}
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

{{- define "regcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "regcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "regcache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "regcache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "regcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "regcache.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "regcache.secretName" -}}
{{- default (include "regcache.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{- define "regcache.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Paths inside the regcache container. */}}
{{- define "regcache.configDir" -}}/etc/regcache{{- end }}
{{- define "regcache.secretDir" -}}/etc/regcache/secrets{{- end }}
{{- define "regcache.dataDir" -}}/var/lib/regcache{{- end }}

{{/* The Secret key holding an upstream's password: upstream-<name>-password. */}}
{{- define "regcache.passwordKey" -}}
{{- printf "upstream-%s-password" (regexReplaceAll "[^-._a-zA-Z0-9]" . "_") }}
{{- end }}

{{/* The Secret key of a notification endpoint's secret header: (list ENDPOINT HEADER). */}}
{{- define "regcache.headerKey" -}}
{{- printf "notify-%s-%s" (regexReplaceAll "[^-._a-zA-Z0-9]" (index . 0) "_") (regexReplaceAll "[^-._a-zA-Z0-9]" (index . 1) "_" | lower) }}
{{- end }}

{{/*
A size in bytes, read as regcache reads sizes (config/units.py): a number and an
optional unit, k/m/g/t/p 1000-based, ki/mi/gi/... 1024-based, case-insensitive,
an optional trailing b. Kubernetes quantities such as 50Gi read the same way.
Takes (list KEY VALUE); KEY names the setting in the error.
*/}}
{{- define "regcache.sizeBytes" -}}
{{- $key := index . 0 }}
{{- $value := index . 1 }}
{{- if or (kindIs "float64" $value) (kindIs "int64" $value) (kindIs "int" $value) }}
{{- printf "%.0f" ($value | float64) }}
{{- else }}
{{- $text := $value | toString | trim }}
{{- $factors := dict "" 1.0 "b" 1.0 "k" 1e3 "kb" 1e3 "ki" 1024.0 "kib" 1024.0 "m" 1e6 "mb" 1e6 "mi" 1048576.0 "mib" 1048576.0 "g" 1e9 "gb" 1e9 "gi" 1073741824.0 "gib" 1073741824.0 "t" 1e12 "tb" 1e12 "ti" 1099511627776.0 "tib" 1099511627776.0 "p" 1e15 "pb" 1e15 "pi" 1125899906842624.0 "pib" 1125899906842624.0 }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text }}
{{- $unit := trimPrefix $number $text | trim | lower }}
{{- if or (not $number) (not (hasKey $factors $unit)) }}
{{- fail (printf "%s: expected a size such as 50Gi, got %q" $key $text) }}
{{- end }}
{{- printf "%.0f" (mulf ($number | float64) (get $factors $unit)) }}
{{- end }}
{{- end }}

{{/* "true" when blobs live in an object store shared by the replicas (S3 mode). */}}
{{- define "regcache.s3" -}}
{{- $storage := default (dict) .Values.config.storage }}
{{- or (eq .Values.mode "deployment") (eq (toString $storage.backend) "s3") }}
{{- end }}

{{/* The Secret and keys holding the S3 access key pair, as (dict name accessKey secretKey); empty: none. */}}
{{- define "regcache.s3Secret" -}}
{{- if .Values.s3.existingSecret }}
{{- toJson (dict "name" .Values.s3.existingSecret "accessKey" .Values.s3.accessKeyKey "secretKey" .Values.s3.secretKeyKey) }}
{{- else if .Values.s3.accessKey }}
{{- toJson (dict "name" (include "regcache.secretName" .) "accessKey" "s3-access-key" "secretKey" "s3-secret-key") }}
{{- else }}
{{- toJson (dict) }}
{{- end }}
{{- end }}

{{/* The store's size budget in bytes: config.storage.max_size, else 90% of the volume. */}}
{{- define "regcache.storeBudgetBytes" -}}
{{- $storage := default (dict) .Values.config.storage }}
{{- if hasKey $storage "max_size" }}
{{- include "regcache.sizeBytes" (list "config.storage.max_size" $storage.max_size) }}
{{- else }}
{{- printf "%.0f" (mulf (include "regcache.sizeBytes" (list "persistence.size" .Values.persistence.size) | float64) 0.9) }}
{{- end }}
{{- end }}

{{/*
The regcache config file. `config` is passed through as it is; the chart adds
what only it knows: where it listens, where the volume is mounted, and which
mounted files hold the secrets.
*/}}
{{- define "regcache.config" -}}
{{- $cfg := deepCopy (default (dict) .Values.config) }}
{{- $_ := set $cfg "listen" (printf "0.0.0.0:%d" (int .Values.containerPort)) }}
{{- $_ := set $cfg "data_dir" (include "regcache.dataDir" .) }}
{{- $admin := default (dict) $cfg.admin }}
{{- $_ := set $admin "token_file" (printf "%s/admin-token" (include "regcache.secretDir" .)) }}
{{- $_ := set $cfg "admin" $admin }}
{{- $upstreams := list }}
{{- range $cfg.upstreams }}
{{- $u := deepCopy . }}
{{- with get $.Values.credentials (toString $u.name) }}
{{- $_ := set $u "username" .username }}
{{- $_ := set $u "password_file" (printf "%s/%s" (include "regcache.secretDir" $) (include "regcache.passwordKey" $u.name)) }}
{{- end }}
{{- $upstreams = append $upstreams $u }}
{{- end }}
{{- if $upstreams }}
{{- $_ := set $cfg "upstreams" $upstreams }}
{{- end }}
{{- $secretHeaders := default (dict) .Values.notifications.secretHeaders }}
{{- if $secretHeaders }}
{{- $notify := default (dict) $cfg.notifications }}
{{- $endpoints := list }}
{{- $names := list }}
{{- range $notify.endpoints }}
{{- $e := deepCopy . }}
{{- $names = append $names (toString $e.name) }}
{{- with get $secretHeaders (toString $e.name) }}
{{- $files := default (dict) $e.header_files }}
{{- range $header, $_ := . }}
{{- $_ := set $files $header (printf "%s/%s" (include "regcache.secretDir" $) (include "regcache.headerKey" (list $e.name $header))) }}
{{- end }}
{{- $_ := set $e "header_files" $files }}
{{- end }}
{{- $endpoints = append $endpoints $e }}
{{- end }}
{{- range $name, $_ := $secretHeaders }}
{{- if not (has $name $names) }}
{{- fail (printf "notifications.secretHeaders: %q is not an endpoint in config.notifications.endpoints" $name) }}
{{- end }}
{{- end }}
{{- $_ := set $notify "endpoints" $endpoints }}
{{- $_ := set $cfg "notifications" $notify }}
{{- end }}
{{- if .Values.tracing.enabled }}
{{- $tracing := default (dict) $cfg.tracing }}
{{- $_ := set $tracing "enabled" true }}
{{- $_ := set $tracing "service_name" .Values.tracing.serviceName }}
{{- $_ := set $cfg "tracing" $tracing }}
{{- end }}
{{- $storage := default (dict) $cfg.storage }}
{{- if eq .Values.mode "deployment" }}
{{- $_ := set $storage "backend" "s3" }}
{{- end }}
{{- if eq (include "regcache.s3" .) "true" }}
{{- if not (and $storage.s3 $storage.s3.bucket) }}
{{- fail "S3 mode (mode: deployment or config.storage.backend: s3) needs config.storage.s3.bucket" }}
{{- end }}
{{- else if and .Values.persistence.enabled (not (hasKey $storage "max_size")) }}
{{- /* The bucket has no size the chart knows: on S3 the budget is the operator's (or the bucket's) call. */}}
{{- $_ := set $storage "max_size" (include "regcache.storeBudgetBytes" . | int64) }}
{{- end }}
{{- if $storage }}
{{- $_ := set $cfg "storage" $storage }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Registries the nodes mirror through the cache, with the server containerd falls back to. */}}
{{- define "regcache.nodeRegistries" -}}
{{- $out := list }}
{{- $servers := dict }}
{{- $ordered := list }}
{{- range .Values.config.upstreams }}
{{- $_ := set $servers (toString .name) (trimSuffix "/" .url) }}
{{- $ordered = append $ordered (toString .name) }}
{{- end }}
{{- $names := default $ordered .Values.nodeConfig.registries }}
{{- range $names }}
{{- $name := toString . }}
{{- $server := get $servers $name }}
{{- if not $server }}
{{- fail (printf "nodeConfig.registries: %q is not an upstream in config.upstreams" $name) }}
{{- end }}
{{- $out = append $out (dict "registry" $name "server" $server) }}
{{- end }}
{{- toJson $out }}
{{- end }}
