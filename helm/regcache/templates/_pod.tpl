{{/*
The regcache pod, shared by the workload kinds (`mode`). The store is the
volume named "data": a PersistentVolumeClaim template in the StatefulSet; in
the Deployment (S3 mode) an emptyDir for spool files and the local index, the
blobs being in the bucket.
*/}}
{{- define "regcache.podTemplate" -}}
metadata:
  labels:
    {{- include "regcache.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A changed config file or secret rolls the pods.
    checksum/config: {{ include "regcache.config" . | sha256sum }}
    {{- if not .Values.secret.existingSecret }}
    checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "regcache.serviceAccountName" . }}
  # regcache never talks to the Kubernetes API.
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  containers:
    - name: regcache
      image: {{ include "regcache.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - serve
        - --config
        - {{ include "regcache.configDir" . }}/config.yaml
      {{- $s3 := include "regcache.s3Secret" . | fromJson }}
      {{- $otlp := and .Values.tracing.enabled .Values.tracing.otlpEndpoint }}
      {{- if or $s3 .Values.extraEnv $otlp }}
      env:
        {{- if $otlp }}
        # Where traces go (OTLP/HTTP); the SDK reads the standard variable.
        - name: OTEL_EXPORTER_OTLP_ENDPOINT
          value: {{ .Values.tracing.otlpEndpoint | quote }}
        {{- end }}
        {{- if $s3 }}
        # The object store's key pair: botocore reads these when the config file names none.
        - name: AWS_ACCESS_KEY_ID
          valueFrom:
            secretKeyRef:
              name: {{ $s3.name }}
              key: {{ $s3.accessKey }}
        - name: AWS_SECRET_ACCESS_KEY
          valueFrom:
            secretKeyRef:
              name: {{ $s3.name }}
              key: {{ $s3.secretKey }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ .Values.containerPort }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: http
        {{- toYaml .Values.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        {{- toYaml .Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        {{- toYaml .Values.probes.readiness | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: {{ include "regcache.dataDir" . }}
        - name: config
          mountPath: {{ include "regcache.configDir" . }}/config.yaml
          subPath: config.yaml
          readOnly: true
        - name: secrets
          mountPath: {{ include "regcache.secretDir" . }}
          readOnly: true
        # The root filesystem is read-only; Python and aiohttp still want a /tmp.
        - name: tmp
          mountPath: /tmp
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "regcache.fullname" . }}
    - name: secrets
      secret:
        secretName: {{ include "regcache.secretName" . }}
        defaultMode: 0440
    - name: tmp
      emptyDir:
        sizeLimit: 256Mi
    {{- if or (eq .Values.mode "deployment") (not .Values.persistence.enabled) }}
    # Deployment (S3) mode: only fill spool files and the local SQLite index live here.
    - name: data
      emptyDir:
        {{- with .Values.spoolSizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
