#!/bin/sh
# Dockerfile.serving's entrypoint: what Vertex AI asks of a custom serving container.
# Vertex sets AIP_HTTP_PORT (the port it sends requests and health checks to: the container port
# launch.upload_model registers) and AIP_STORAGE_URI (a gs:// copy of the Model's artifact_uri,
# the base folder of the export's version folders). TF Serving then answers the routes that
# launch.upload_model registers: POST /v1/models/ham10000:predict and GET /v1/models/ham10000.
set -eu
: "${AIP_STORAGE_URI:?AIP_STORAGE_URI is not set: Vertex AI sets it to the model's artifact folder (or set it to the serving base folder, e.g. gs://BUCKET/runs/r1/model/serving)}"
# TF Serving reads a base folder of numbered version folders, each a SavedModel: given a version
# folder, or a folder with no version in it, it would start and wait forever for a model.
base="${AIP_STORAGE_URI%/}"
case "${base##*/}" in
  ''|*[!0-9]*) ;;
  *) echo "AIP_STORAGE_URI=$AIP_STORAGE_URI is a version folder; TF Serving needs its parent, the base folder that holds the numbered versions (e.g. gs://BUCKET/runs/r1/model/serving, which holds 1/saved_model.pb)" >&2
     exit 2 ;;
esac
if [ -d "$base" ]; then  # a local or mounted folder: its versions can be looked at before starting
  if [ -f "$base/saved_model.pb" ]; then
    echo "AIP_STORAGE_URI=$AIP_STORAGE_URI is a SavedModel itself; TF Serving needs the base folder above it, with the SavedModel in a numbered version folder (serving/1/saved_model.pb)" >&2
    exit 2
  fi
  if ! ls "$base"/*/saved_model.pb 2>/dev/null | grep -q '/[0-9][0-9]*/saved_model.pb$'; then
    echo "AIP_STORAGE_URI=$AIP_STORAGE_URI holds no version folder (a numbered folder with saved_model.pb, as the training job writes in model/serving/1): point it at the run's serving folder" >&2
    exit 2
  fi
fi
grpc_port=8500
if [ "${AIP_HTTP_PORT:-8501}" = "$grpc_port" ]; then grpc_port=8502; fi
exec tensorflow_model_server --port="$grpc_port" --rest_api_port="${AIP_HTTP_PORT:-8501}" \
  --model_name=ham10000 --model_base_path="$AIP_STORAGE_URI" "$@"
