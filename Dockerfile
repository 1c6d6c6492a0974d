# syntax=docker/dockerfile:1
#
# The run image of the processing plane on Kubernetes (docs/kubernetes.md). One image serves as
# the code server (the Helm chart's user deployment, which reports this image to Dagster), the
# run worker of every run (a Kubernetes Job started by the run launcher), and, because the run
# queue and launcher are the plane's own classes, the Dagster webserver and daemon too.
#
#   docker build -t registry.internal/ergot/ergot-dagster:$(git rev-parse --short HEAD) .
#
# No secret is baked in: PostgreSQL, object storage and runtime credentials arrive as
# environment variables from Kubernetes Secrets when a pod starts.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# What the runtimes run besides Python: ffmpeg/ffprobe (the FFmpeg runtime, probing, audio and
# frame handling in the other runtimes) and espeak-ng (the second local TTS engine). The other
# local engines (piper, faster-whisper, silero/webrtc VAD, dlib) ship their native code and models
# in their wheels. tini is PID 1, so that a run worker gets the SIGTERM of a deleted Job.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg espeak-ng tini \
    && rm -rf /var/lib/apt/lists/*

# The package and its dependencies, without the dev extras (no test tools, no browsers).
WORKDIR /opt/ergot/src
COPY pyproject.toml README.md ./
COPY ergot_dagster ./ergot_dagster
RUN pip install . \
    && rm -rf /opt/ergot/src

# Definitions and targets are data the package reads from these paths (ERGOT_* below): the
# published workflow definitions with their lock, and the cluster's runtime targets.
COPY workflow_defs /opt/ergot/workflow_defs
COPY deploy/k8s/runtime_targets.yaml /opt/ergot/deploy/k8s/runtime_targets.yaml

# An unprivileged user with a numeric id, so that `runAsNonRoot` can be checked by the kubelet.
# DAGSTER_HOME matches the Helm chart's default (dagsterHome) and the run launcher's dagster_home;
# the instance's dagster.yaml is mounted there from a ConfigMap, never baked in.
RUN groupadd --system --gid 10001 ergot \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ergot --shell /usr/sbin/nologin ergot \
    && mkdir -p /opt/dagster/dagster_home /var/lib/ergot \
    && chown -R 10001:10001 /opt/dagster/dagster_home /var/lib/ergot

ENV HOME=/var/lib/ergot \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    ERGOT_HOME=/var/lib/ergot \
    ERGOT_WORKFLOW_DEFS=/opt/ergot/workflow_defs \
    ERGOT_RUNTIME_TARGETS=/opt/ergot/deploy/k8s/runtime_targets.yaml

USER 10001:10001
WORKDIR /var/lib/ergot

# The run launcher gives a run's Job only `args` (dagster api execute_run ...), which follow this
# entrypoint; the Helm chart gives its pods their own command. Without arguments, the image is
# the code server.
EXPOSE 3030
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["dagster", "api", "grpc", "--host", "0.0.0.0", "--port", "3030", "--module-name", "ergot_dagster.definitions", "--attribute", "defs"]
