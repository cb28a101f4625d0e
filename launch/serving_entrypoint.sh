#!/bin/sh
# Dockerfile.serving's entrypoint: what Vertex AI asks of a custom serving container.
# Vertex sets AIP_HTTP_PORT (the port it sends requests and health checks to: the container port
# launch.upload_model registers) and AIP_STORAGE_URI (a gs:// copy of the Model's artifact_uri,
# the base folder of the export's version folders). TF Serving then answers the routes that
# launch.upload_model registers: POST /v1/models/ham10000:predict and GET /v1/models/ham10000.
set -eu
: "${AIP_STORAGE_URI:?AIP_STORAGE_URI is not set: Vertex AI sets it to the model's artifact folder (or set it to the serving base folder, e.g. gs://BUCKET/runs/r1/model/serving)}"
grpc_port=8500
if [ "${AIP_HTTP_PORT:-8501}" = "$grpc_port" ]; then grpc_port=8502; fi
exec tensorflow_model_server --port="$grpc_port" --rest_api_port="${AIP_HTTP_PORT:-8501}" \
  --model_name=ham10000 --model_base_path="$AIP_STORAGE_URI" "$@"
