# The API (and beat): FastAPI + Celery client + boto3, no torch. Built by docker-compose.yml as
# atelier-api:local; run alone with `docker run --env-file .env -p 8000:8000 atelier-api:local`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ATELIER_HOME=/var/lib/atelier

WORKDIR /app

# Dependencies first, from pyproject alone, so a source change does not reinstall them. The
# Redis broker needs celery's `redis` extra (kombu's Redis transport imports `packaging`).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && echo 'celery[redis]' >> /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Editable: the migrations and the dashboard's static files are read from the source folders.
COPY . .
RUN pip install --no-deps -e . \
    && useradd --system --uid 10001 --home-dir /var/lib/atelier atelier \
    && mkdir -p /var/lib/atelier /models \
    && chown atelier /var/lib/atelier /models \
    && ! python -c "import torch" 2>/dev/null

USER atelier
EXPOSE 8000
CMD ["atelier", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
