{{/*
Names
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "keel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name of the release's objects: fullnameOverride, or
<release>-<name> (just <release> when it already contains the name).
Truncated to 63 characters (DNS label limit); suffixed objects are named
with keel.suffixed so that they stay within it too.
*/}}
{{- define "keel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<suffix> within 63 characters. Call with (list . "suffix"). */}}
{{- define "keel.suffixed" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $base := include "keel.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end -}}

{{/* name-version, as the helm.sh/chart label. */}}
{{- define "keel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels
*/}}

{{/* The labels that select the release's keel pods. Never change them on an
existing release: a Deployment's selector is immutable. */}}
{{- define "keel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Standard labels of every object, then commonLabels. Every template
uses it (or keel.testLabels), so a value in commonLabels lands on every
object and pod template; new templates should too. commonLabels cannot
override the standard keys, which selectors rely on. */}}
{{- define "keel.labels" -}}
helm.sh/chart: {{ include "keel.chart" . }}
{{ include "keel.selectorLabels" . }}
app.kubernetes.io/version: {{ include "keel.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "keel.name" . }}
{{- include "keel.commonLabels" . }}
{{- end -}}

{{/* commonLabels as YAML lines (with a leading newline), minus the keys
the chart sets itself. Refuses the selector keys. */}}
{{- define "keel.commonLabels" -}}
{{- $own := list "helm.sh/chart" "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "app.kubernetes.io/part-of" "app.kubernetes.io/component" -}}
{{- range $key, $value := (.Values.commonLabels | default dict) -}}
{{- if has $key $own -}}
{{- fail (printf "commonLabels.%s: the chart sets this label itself (selectors depend on it); use another key." $key) -}}
{{- end }}
{{ $key }}: {{ $value | toString | quote }}
{{- end -}}
{{- end -}}

{{/*
Annotations of an object: commonAnnotations merged with the object's own
(which win). Call with (list . $own); renders a complete `annotations:`
block, or nothing when both are empty. Indent with nindent 2 under
metadata:

  metadata:
    name: x
    {{- include "keel.annotations" (list . .Values.service.annotations) | nindent 2 }}
*/}}
{{- define "keel.annotations" -}}
{{- $root := index . 0 -}}
{{- $merged := merge (deepCopy (index . 1 | default dict)) (deepCopy ($root.Values.commonAnnotations | default dict)) -}}
{{- with $merged }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* The namespace of every object: namespaceOverride or the release's. */}}
{{- define "keel.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of the helm test pod: standard, but deliberately NOT matching
keel.selectorLabels, so that no Service, PodDisruptionBudget or spread
constraint ever counts it as a keel pod. */}}
{{- define "keel.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "keel.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end -}}

{{- define "keel.testLabels" -}}
helm.sh/chart: {{ include "keel.chart" . }}
{{ include "keel.testSelectorLabels" . }}
app.kubernetes.io/version: {{ include "keel.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "keel.name" . }}
{{- include "keel.commonLabels" . }}
{{- end -}}

{{/* Extra label of the metrics Service, which the ServiceMonitor selects. */}}
{{- define "keel.metricsComponentLabel" -}}
app.kubernetes.io/component: metrics
{{- end -}}

{{/*
Image
*/}}

{{- define "keel.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString -}}
{{- end -}}

{{- define "keel.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (include "keel.imageTag" .) -}}
{{- end -}}
{{- end -}}

{{/*
Service account
*/}}

{{- define "keel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keel.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Durations

keel.durationNanos turns a duration as keel's config accepts it ("250ms",
"5s", "1m", "1m30s", "1h 5m") into integer nanoseconds. It fails rendering
with the key's name on anything else, so a bad duration is caught even when
schema validation is skipped. Call with (list "config.key" value).
*/}}
{{- define "keel.durationNanos" -}}
{{- $key := index . 0 -}}
{{- $text := index . 1 | toString | trim -}}
{{- $unit := "(ns|us|ms|s|m|h|d)" -}}
{{- if not (regexMatch (printf "^[0-9]+%s( ?[0-9]+%s)*$" $unit $unit) $text) -}}
{{- fail (printf "%s: invalid duration %q: expected e.g. 250ms, 5s, 1m or 1m30s (units ns, us, ms, s, m, h, d)" $key $text) -}}
{{- end -}}
{{- $factor := dict "ns" 1 "us" 1000 "ms" 1000000 "s" 1000000000 "m" 60000000000 "h" 3600000000000 "d" 86400000000000 -}}
{{- $total := 0 -}}
{{- range $part := regexFindAll (printf "[0-9]+%s" $unit) $text -1 -}}
{{- $number := regexFind "^[0-9]+" $part -}}
{{- $suffix := trimPrefix $number $part -}}
{{- $total = add $total (mul (atoi $number) (index $factor $suffix)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* Whole seconds, rounded up, of a number of nanoseconds. */}}
{{- define "keel.ceilSeconds" -}}
{{- div (add (int64 .) 999999999) 1000000000 -}}
{{- end -}}

{{/*
Shutdown and the grace period

keel's worst-case shutdown is drain_delay + timeout + flush_timeout + 1s
(the 1s covers the grace for cancelled streams and the exit). The kubelet
sends SIGKILL terminationGracePeriodSeconds after SIGTERM, so the grace period
must cover it: computed as ceil(drain_delay + timeout + flush_timeout) +
margin, or, when set explicitly, refused if it is shorter than
ceil(drain_delay + timeout + flush_timeout + 1s).
*/}}
{{- define "keel.shutdownNanos" -}}
{{- $shutdown := (.Values.config | default dict).shutdown | default dict -}}
{{- $drain := include "keel.durationNanos" (list "config.shutdown.drain_delay" ($shutdown.drain_delay | default "5s")) -}}
{{- $timeout := include "keel.durationNanos" (list "config.shutdown.timeout" ($shutdown.timeout | default "20s")) -}}
{{- $flush := include "keel.durationNanos" (list "config.shutdown.flush_timeout" ($shutdown.flush_timeout | default "1s")) -}}
{{- add (int64 $drain) (int64 $timeout) (int64 $flush) -}}
{{- end -}}

{{- define "keel.terminationGracePeriodSeconds" -}}
{{- $shutdown := (.Values.config | default dict).shutdown | default dict -}}
{{- $nanos := int64 (include "keel.shutdownNanos" .) -}}
{{- $minimum := int64 (include "keel.ceilSeconds" (add $nanos 1000000000)) -}}
{{- $explicit := .Values.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $explicit -}}
{{- add (include "keel.ceilSeconds" $nanos) (.Values.terminationGracePeriodMarginSeconds | default 0) -}}
{{- else if lt (int64 $explicit) $minimum -}}
{{- fail (printf "terminationGracePeriodSeconds=%v is too short: keel may take up to config.shutdown.drain_delay (%s) + config.shutdown.timeout (%s) + config.shutdown.flush_timeout (%s) + 1s to shut down, so it must be at least %d. Raise it, or leave it null to have it computed." $explicit ($shutdown.drain_delay | default "5s") ($shutdown.timeout | default "20s") ($shutdown.flush_timeout | default "1s") $minimum) -}}
{{- else -}}
{{- int64 $explicit -}}
{{- end -}}
{{- end -}}

{{/*
Configuration

The config.yaml rendered into the ConfigMap: .Values.config with the listen
addresses derived from .Values.ports. Fails on the keys the chart owns, so
that they cannot be set in two places.
*/}}
{{- define "keel.config" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- $auth := $config.auth | default dict -}}
{{- if hasKey $auth "tokens" -}}
{{- fail "config.auth.tokens must not be set: tokens are secret and never go into the ConfigMap. Use auth.tokens or auth.existingSecret." -}}
{{- end -}}
{{- if hasKey $auth "tokens_file" -}}
{{- fail (printf "config.auth.tokens_file must not be set: the chart mounts the tokens Secret (auth.existingSecret or its own) at %s and sets it. Use auth.existingSecret." (include "keel.authTokensFile" .)) -}}
{{- end -}}
{{- if include "keel.authEnabled" . -}}
{{- $_ := set $auth "tokens_file" (include "keel.authTokensFile" .) -}}
{{- $_ := set $config "auth" $auth -}}
{{- end -}}
{{- $ports := list (int .Values.ports.grpc) (int .Values.ports.http) (int .Values.ports.admin) -}}
{{- if ne (len ($ports | uniq)) 3 -}}
{{- fail (printf "ports: grpc (%d), http (%d) and admin (%d) must be three different ports." (index $ports 0) (index $ports 1) (index $ports 2)) -}}
{{- end -}}
{{- range $section := list "grpc" "http" "admin" -}}
{{- $values := get $config $section | default dict -}}
{{- if hasKey $values "addr" -}}
{{- fail (printf "config.%s.addr must not be set: the chart derives it from listenHost and ports.%s." $section $section) -}}
{{- end -}}
{{- $_ := set $values "addr" (printf "%s:%d" $.Values.listenHost (int (get $.Values.ports $section))) -}}
{{- $_ := set $config $section $values -}}
{{- end -}}
{{- $database := $config.database | default dict -}}
{{- if hasKey $database "url" -}}
{{- fail "config.database.url must not be set: the URL is secret and never goes into the ConfigMap. Put it in a Secret and set database.existingSecret (and database.existingSecretKey)." -}}
{{- end -}}
{{- if include "keel.databaseEnabled" . -}}
{{- $file := include "keel.databaseUrlFile" . -}}
{{- if and $database.url_file (ne $database.url_file $file) -}}
{{- fail (printf "config.database.url_file=%s conflicts with database.existingSecret: the chart mounts that Secret at %s and sets url_file itself. Unset config.database.url_file." $database.url_file $file) -}}
{{- end -}}
{{- $_ := set $database "url_file" $file -}}
{{- $_ := set $config "database" $database -}}
{{- else if $database.url_file -}}
{{- fail "config.database.url_file is set but database.existingSecret is not: set database.existingSecret (and database.existingSecretKey) to the Secret holding the URL, and unset config.database.url_file; the chart mounts it and sets url_file." -}}
{{- end -}}
{{- if (.Values.tls | default dict).enabled -}}
{{- $dir := include "keel.tlsDir" . -}}
{{- $files := dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir) -}}
{{- if .Values.tls.mtls -}}
{{- $_ := set $files "client_ca_file" (printf "%s/ca.crt" $dir) -}}
{{- end -}}
{{- range $section := list "grpc" "http" -}}
{{- $values := get $config $section | default dict -}}
{{- $_ := set $values "tls" $files -}}
{{- $_ := set $config $section $values -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/*
TLS: a kubernetes.io/tls Secret, yours or cert-manager's, mounted as files.
*/}}
{{- define "keel.tlsDir" -}}/var/run/secrets/keel/tls{{- end -}}

{{- define "keel.tlsSecretName" -}}
{{- if .Values.tls.existingSecret -}}
{{- .Values.tls.existingSecret -}}
{{- else if .Values.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "keel.fullname" .) -}}
{{- else -}}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret) or tls.certManager.enabled." -}}
{{- end -}}
{{- end -}}

{{/* "true" when keel terminates TLS on the gRPC port. */}}
{{- define "keel.grpcTls" -}}
{{- if (.Values.tls | default dict).enabled -}}true{{- end -}}
{{- end -}}

{{/*
Authentication
*/}}

{{/* "true" when keel needs tokens, i.e. unless config.auth.disabled. */}}
{{- define "keel.authEnabled" -}}
{{- $auth := (.Values.config | default dict).auth | default dict -}}
{{- if not $auth.disabled -}}true{{- end -}}
{{- end -}}

{{/* "true" when the chart creates the tokens Secret. */}}
{{- define "keel.createAuthSecret" -}}
{{- if and (include "keel.authEnabled" .) (not .Values.auth.existingSecret) -}}true{{- end -}}
{{- end -}}

{{- define "keel.authSecretName" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else -}}
{{- include "keel.suffixed" (list . "auth") -}}
{{- end -}}
{{- end -}}

{{- define "keel.authSecretKey" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecretKey -}}
{{- else -}}
tokens
{{- end -}}
{{- end -}}

{{/* "true" when the chart generates the token (no tokens, no existingSecret). */}}
{{- define "keel.generatedToken" -}}
{{- if and (include "keel.createAuthSecret" .) (not .Values.auth.tokens) .Values.auth.generate -}}true{{- end -}}
{{- end -}}

{{/*
The tokens Secret is mounted as a directory (a secret volume, no subPath,
so that the kubelet's updates reach the file) and keel reads it through
config.auth.tokens_file, which the chart sets; keel re-reads it on change.
*/}}
{{- define "keel.authDir" -}}/var/run/secrets/keel/auth{{- end -}}
{{- define "keel.authTokensFile" -}}{{ include "keel.authDir" . }}/tokens{{- end -}}

{{- define "keel.authVolume" -}}
- name: auth
  secret:
    secretName: {{ include "keel.authSecretName" . }}
    items:
      - key: {{ include "keel.authSecretKey" . }}
        path: tokens
    # Owner and the pod's fsGroup may read it; nobody may write.
    defaultMode: 288
{{- end -}}

{{- define "keel.authVolumeMount" -}}
- name: auth
  mountPath: {{ include "keel.authDir" . }}
  readOnly: true
{{- end -}}

{{/*
Scraping and the PodDisruptionBudget
*/}}

{{/* "true" when the pods carry the prometheus.io scrape annotations. */}}
{{- define "keel.scrapeAnnotations" -}}
{{- if and (not .Values.serviceMonitor.enabled) .Values.scrapeAnnotations -}}true{{- end -}}
{{- end -}}

{{/*
"true" when the PodDisruptionBudget renders: podDisruptionBudget.enabled,
or, while it is null, whenever more than one pod can run. Fails for an
explicit true with fewer than two pods.
*/}}
{{- define "keel.pdbEnabled" -}}
{{- $enabled := .Values.podDisruptionBudget.enabled -}}
{{- $replicas := int (include "keel.replicaCount" .) -}}
{{- $minimum := ternary (int .Values.autoscaling.minReplicas) $replicas (.Values.autoscaling.enabled | default false) -}}
{{- if kindIs "invalid" $enabled -}}
{{- if ge $minimum 2 -}}true{{- end -}}
{{- else if $enabled -}}
{{- if lt $minimum 2 -}}
{{- if .Values.autoscaling.enabled -}}
{{- fail (printf "podDisruptionBudget.enabled=true with autoscaling.minReplicas=%d: with a single pod the budget either blocks every node drain or protects nothing. Set autoscaling.minReplicas to 2 or more, or podDisruptionBudget.enabled=false (or null: on whenever 2 or more pods run)." $minimum) -}}
{{- else -}}
{{- fail (printf "podDisruptionBudget.enabled=true with replicaCount=%d: with a single pod the budget either blocks every node drain or protects nothing. Set replicaCount to 2 or more (with database.existingSecret or store=none: the memory store cannot be shared), or podDisruptionBudget.enabled=false (or null: on whenever 2 or more pods run)." $minimum) -}}
{{- end -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/*
Probes

One probe: (list $ "readiness" "/readyz"). The handler follows probes.type;
the timings come from probes.<name>.
*/}}
{{- define "keel.probe" -}}
{{- $root := index . 0 -}}
{{- $settings := index $root.Values.probes (index . 1) -}}
{{- $path := index . 2 -}}
{{- /* The kubelet's gRPC probe cannot speak TLS: HTTP on admin then. */ -}}
{{- if and (eq $root.Values.probes.type "grpc") (not (include "keel.grpcTls" $root)) }}
grpc:
  port: {{ $root.Values.ports.grpc }}
{{- else }}
httpGet:
  path: {{ $path }}
  port: admin
  scheme: HTTP
{{- end }}
{{- with $settings.initialDelaySeconds }}
initialDelaySeconds: {{ . }}
{{- end }}
periodSeconds: {{ $settings.periodSeconds }}
timeoutSeconds: {{ $settings.timeoutSeconds }}
failureThreshold: {{ $settings.failureThreshold }}
successThreshold: {{ $settings.successThreshold | default 1 }}
{{- end -}}

{{/*
Database and store

database.existingSecret names a Secret holding the PostgreSQL URL. Its key
is mounted read-only as a file (a secret volume, no subPath, so that a
rotated Secret reaches the file) and keel reads it through
config.database.url_file, which the chart sets.
*/}}
{{- define "keel.databaseDir" -}}/var/run/secrets/keel/database{{- end -}}
{{- define "keel.databaseUrlFile" -}}{{ include "keel.databaseDir" . }}/url{{- end -}}

{{/* "true" when a database is configured. */}}
{{- define "keel.databaseEnabled" -}}
{{- if (.Values.database | default dict).existingSecret -}}true{{- end -}}
{{- end -}}

{{/* The secret volume of the database URL (a list item, indent it). */}}
{{- define "keel.databaseVolume" -}}
- name: database
  secret:
    secretName: {{ .Values.database.existingSecret }}
    items:
      - key: {{ .Values.database.existingSecretKey | default "url" }}
        path: url
    # Owner and the pod's fsGroup may read it; nobody may write.
    defaultMode: 288
{{- end -}}

{{- define "keel.databaseVolumeMount" -}}
- name: database
  mountPath: {{ include "keel.databaseDir" . }}
  readOnly: true
{{- end -}}

{{/*
The store: .Values.store, or computed (postgres with a database, memory
without). Fails on the combinations keel cannot run.
*/}}
{{- define "keel.store" -}}
{{- $database := include "keel.databaseEnabled" . -}}
{{- $store := .Values.store | default (ternary "postgres" "memory" (eq $database "true")) -}}
{{- if and (eq $store "postgres") (not $database) -}}
{{- fail "store=postgres needs a database: set database.existingSecret (a Secret holding the PostgreSQL URL under database.existingSecretKey)." -}}
{{- end -}}
{{- if and (ne $store "postgres") $database -}}
{{- fail (printf "store=%s with database.existingSecret=%s: keel uses PostgreSQL whenever a database is configured. Unset store (or set store=postgres), or unset database.existingSecret." $store .Values.database.existingSecret) -}}
{{- end -}}
{{- $store -}}
{{- end -}}

{{/*
The replica count: replicaCount, or 1 with the memory store and 2 otherwise.
Fails when the memory store would be split over several pods.
*/}}
{{- define "keel.replicaCount" -}}
{{- $store := include "keel.store" . -}}
{{- $replicas := 0 -}}
{{- if kindIs "invalid" .Values.replicaCount -}}
{{- $replicas = ternary 1 2 (eq $store "memory") -}}
{{- else -}}
{{- $replicas = int .Values.replicaCount -}}
{{- end -}}
{{- if eq $store "memory" -}}
{{- if .Values.autoscaling.enabled -}}
{{- fail "autoscaling.enabled=true with the memory store: each pod would keep its own data, which cannot be shared. Set database.existingSecret (store postgres), or store=none for a stateless service, or autoscaling.enabled=false." -}}
{{- end -}}
{{- if gt $replicas 1 -}}
{{- fail (printf "replicaCount=%d with the memory store: each pod would keep its own data, which cannot be shared. Set database.existingSecret (store postgres), or store=none for a stateless service, or replicaCount=1." $replicas) -}}
{{- end -}}
{{- end -}}
{{- $replicas -}}
{{- end -}}
