# One container: Mosquitto and the subscriber under Supervisor (see supervisord.conf), both as a non-root user.
# LISTEN_ADDRESS=0.0.0.0: the container has its own network; only the ports published with it are reachable.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8080 \
    LISTEN_ADDRESS=0.0.0.0 \
    SPOOL_DIR=/data/spool \
    MOSQUITTO_DATA_DIR=/data/mosquitto \
    BRIDGE_RUN_DIR=/tmp/fmi-mqtt-bridge

# Debian's Mosquitto; its service scripts are not used, Supervisor runs the binary in the foreground.
# The bookworm base pins it to Mosquitto 2.0; an exact Debian revision would break the build the day the
# mirror serves the next security update, so none is given.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin bridge

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY mqtt_subscriber.py mosquitto.conf supervisord.conf ./
COPY fmi_bridge/ fmi_bridge/
COPY schemas/ schemas/

# Writable state (the spool and Mosquitto's persistence) lives only under /data.
RUN mkdir -p /data/spool /data/mosquitto && chown -R 10001:10001 /data
VOLUME ["/data"]

USER 10001:10001
# 8080: the health checks; 1883: MQTT (LOCAL, DEV); 8883: MQTT over TLS (PPRD, PRD). /metrics listens on
# 127.0.0.1:9464 inside the container only, so it is not exposed.
EXPOSE 8080 1883 8883
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readiness_check', timeout=4)"]
CMD ["python", "-m", "fmi_bridge.container.launch"]
