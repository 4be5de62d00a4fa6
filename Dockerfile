# regcache: a pull-through caching proxy for container registries.
#   docker build -t regcache .
#   docker run -p 5000:5000 -v regcache:/var/lib/regcache regcache
# The Helm chart (helm/regcache) runs the same entrypoint with --config.
ARG PYTHON_IMAGE=python:3.11-slim

# Build stage: install regcache and its dependencies into a virtualenv that the
# runtime stage copies whole (same base image, so the same /usr/local python).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/regcache
WORKDIR /src
COPY pyproject.toml README.md ./
COPY config/ config/
COPY proxy/ proxy/
COPY storage/ storage/
# Optional extras, comma-separated: --build-arg EXTRAS=tracing (OpenTelemetry), s3, fast.
ARG EXTRAS=""
RUN /opt/regcache/bin/pip install ".${EXTRAS:+[$EXTRAS]}"

# Runtime stage: no build tools, no pip cache, a numeric non-root user (Kubernetes
# can only prove runAsNonRoot for a numeric USER).
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/regcache/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 regcache \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/regcache --no-create-home \
      --shell /usr/sbin/nologin regcache \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/regcache
COPY --from=build /opt/regcache /opt/regcache
USER 10001:10001
WORKDIR /var/lib/regcache
VOLUME ["/var/lib/regcache"]
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=3s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=2)"]
ENTRYPOINT ["regcache"]
CMD ["serve", "--data-dir", "/var/lib/regcache"]
