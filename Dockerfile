# FedHub images: the server, a device (or a pool of devices) and the Streamlit dashboard.
#
#   make docker                                        # how CI builds them (see docker/build.sh)
#   docker build --target server -t fedhub-server .   # or by hand, installing from the package index
#
# BASE_IMAGE is any Python 3.11 image with venv: the official python:3.11-slim by default, or
# fedhub-base:py311 built from Debian's packages by docker/base-image.sh where no image can be
# pulled. Build and runtime stages start from the same base, so /opt/venv's interpreter path
# holds in the runtime stage whichever it is. Nothing here copies state, secrets or data:
# .dockerignore admits only the code, the dependency list and docker/wheels/ (a whitelist).
ARG BASE_IMAGE=python:3.11-slim
# The framework the server and device images train with: keras (TensorFlow) or torch (PyTorch,
# no TensorFlow): FEDHUB_FRAMEWORK=torch make docker builds them as fedhub-server:torch and
# fedhub-device:torch (docker-compose.torch.yml runs them).
ARG FRAMEWORK=keras

# ---------------------------------------------------------------- dependencies, in /opt/venv
# Each image leaves out what it never imports: the dashboard has no TensorFlow, the server and
# devices no Streamlit. Only the lists' content reaches the install steps, so a change to
# pyproject.toml elsewhere (a pytest marker) does not reinstall TensorFlow.
FROM ${BASE_IMAGE} AS requirements
ARG FRAMEWORK
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN python3 /tmp/build/requirements.py /tmp/build/pyproject.toml --extra "$FRAMEWORK" \
        --without streamlit altair pandas > /tmp/build/ml.txt \
 && python3 /tmp/build/requirements.py /tmp/build/pyproject.toml \
        --without tensorboard > /tmp/build/dashboard.txt

FROM ${BASE_IMAGE} AS deps
# The official image has python3 in /usr/local/bin, Debian's in /usr/bin: the venv hides which.
RUN python3 -m venv /opt/venv
COPY docker/install-deps.sh /usr/local/bin/install-deps
COPY docker/wheels/ /tmp/wheels/

FROM deps AS deps-ml
COPY --from=requirements /tmp/build/ml.txt /tmp/requirements.txt
# TensorFlow's C++ headers (290 MB) serve only to compile custom ops.
RUN install-deps /tmp/requirements.txt \
 && rm -rf /opt/venv/lib/python3.11/site-packages/tensorflow/include

FROM deps AS deps-dashboard
COPY --from=requirements /tmp/build/dashboard.txt /tmp/requirements.txt
RUN install-deps /tmp/requirements.txt

# ---------------------------------------------------------------- the code, in /app
FROM scratch AS code
COPY server.py model.py /app/
COPY device/ /app/device/
COPY utils/ /app/utils/
COPY dashboard/ /app/dashboard/
COPY dashboard_stats/ /app/dashboard_stats/
COPY fedhub/ /app/fedhub/
COPY .streamlit/ /app/.streamlit/
COPY docker/device-entrypoint.sh /app/docker/device-entrypoint.sh

# ---------------------------------------------------------------- runtime: one unprivileged user
FROM ${BASE_IMAGE} AS runtime
# PYTHONPATH: /app holds the fedhub package, which every entry point imports (device/device.py too).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    FEDHUB_DEVICES_ROOT=/var/lib/fedhub/devices
# /var/lib/fedhub is where a volume keeps state; a new named volume mounted there takes this owner.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/fedhub fedhub \
 && mkdir -p /var/lib/fedhub && chown fedhub:fedhub /var/lib/fedhub
WORKDIR /app
# `docker stop` as Ctrl-C: Python handles SIGINT from start-up, even as PID 1, so a device
# leaves the federation and the server stops cleanly, whenever the signal comes.
STOPSIGNAL SIGINT

# The server: state, history and TensorBoard runs under /var/lib/fedhub. Flags after the image
# name are added to these (`docker run fedhub-server --rounds 10 --auto-activate`).
FROM runtime AS server
COPY --from=deps-ml /opt/venv /opt/venv
COPY --from=code /app /app
USER fedhub
ENV FEDHUB_HEALTH_URL=http://127.0.0.1:4000/health
EXPOSE 4000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['FEDHUB_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["python", "server.py", "--host", "0.0.0.0", "--port", "4000", \
            "--state-dir", "/var/lib/fedhub/state", "--eval-dir", "/var/lib/fedhub/eval"]

# A device: `docker run fedhub-device --server URL --name device1` runs device/device.py with
# those flags; a command instead runs that (`... fedhub-device python -m fedhub.device.launcher ...`).
# The entrypoint first makes the device's share of Fashion-MNIST when asked (see the script).
FROM runtime AS device
COPY --from=deps-ml /opt/venv /opt/venv
COPY --from=code /app /app
USER fedhub
ENTRYPOINT ["docker/device-entrypoint.sh"]
CMD ["--help"]

# The control dashboard, on every interface of its container: publish it on 127.0.0.1 only.
FROM runtime AS dashboard
COPY --from=deps-dashboard /opt/venv /opt/venv
COPY --from=code /app /app
USER fedhub
EXPOSE 8501
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
ENTRYPOINT ["streamlit", "run", "dashboard/index.py", "--server.address", "0.0.0.0", \
            "--server.port", "8501", "--browser.gatherUsageStats", "false"]
