# One image for every service (worker, Gateway, Flower); the command picks the role.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY workers ./workers
COPY tasks ./tasks
COPY config ./config
COPY devkit ./devkit
RUN pip install ".[servers]" && useradd --create-home --uid 10001 sark
USER sark
CMD ["sark", "worker"]
