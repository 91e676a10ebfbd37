# mcp-imagegen as one replica of a team deployment (see the README, "Serving a team").
# Streamable HTTP without sessions, so any replica can take any request; configuration from the
# file named by MCP_IMAGEGEN_CONFIG (mount it), secrets from the environment.
FROM python:3.12-slim

RUN useradd --create-home --uid 10001 imagegen
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mcp_imagegen ./mcp_imagegen
COPY manifests ./manifests
RUN pip install --no-cache-dir '.[team]'

USER imagegen
ENV MCP_IMAGEGEN_CONFIG=/etc/mcp-imagegen/mcp-imagegen.toml \
    PORT=8000 \
    FORWARDED_ALLOW_IPS=*
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['PORT'])"
# SIGTERM drains: /readyz and new requests get 503, calls in flight finish and save their images.
STOPSIGNAL SIGTERM
CMD ["sh", "-c", "exec mcp-imagegen serve --transport http --host 0.0.0.0 --port \"$PORT\" --stateless"]
