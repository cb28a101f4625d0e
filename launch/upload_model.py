r"""Uploads the job's serving SavedModel to the Vertex AI Model Registry.

  python -m launch.upload_model --project=P --region=us-central1 \
      --artifact_uri=gs://B/runs/r1/model/serving --display_name=ham10000-resnet50 \
      [--serving_image=REGION-docker.pkg.dev/P/REPO/ham10000-serving:1] [--dry_run]

The training job writes the SavedModel in TF Serving's layout: {model_dir}/serving/1/ (on
Vertex AI, the launcher's --model_dir + /model/serving/1). Its `serving_default` signature
takes JPEG bytes (`image_bytes`) and returns calibrated probabilities. `--artifact_uri`
takes the base folder (…/serving) or the version folder (…/serving/1), and each container
gets what it reads: Vertex AI's pre-built TensorFlow containers the SavedModel's own folder,
a TensorFlow Serving image (this project's Dockerfile.serving) the base folder.

The serving container: Vertex AI's pre-built TensorFlow prediction containers stop at 2.15,
older than the TensorFlow that trains, and their end of availability is scheduled
(PREBUILT_END_OF_AVAILABILITY); the export uses no op 2.15 lacks, and tests/test_launch.py
loads it under tensorflow-cpu 2.15 and checks that it returns the same probabilities, so
the pre-built container stays the default while it exists. `--serving_image` takes another:
the image Dockerfile.serving builds (TensorFlow Serving 2.19, tested the same way under
TensorFlow 2.19), called on TF Serving's REST routes for the model name `ham10000`.
`--dry_run` prints the Model as REST JSON (the body of models:upload's `model`) and calls
nothing.
"""

import re

from absl import flags, logging

from launch import vertex
from tfrecords import cli

FLAGS = flags.FLAGS
PREBUILT_PREFIX = "us-docker.pkg.dev/vertex-ai/prediction/"
DEFAULT_SERVING_IMAGE = PREBUILT_PREFIX + "tf2-cpu.2-15:latest"
# Vertex AI's support schedule for its pre-built prediction containers lists tf2-cpu.2-15's end
# of availability in January 2027.
PREBUILT_END_OF_AVAILABILITY = "January 2027"
TF_SERVING_MODEL_NAME = "ham10000"
TF_SERVING_REST_PORT = 8501  # Vertex passes it to the container as AIP_HTTP_PORT
SERVING_VERSION = "1"  # job/artifacts.py's: the version folder the job writes


def define_flags():
  flags.DEFINE_string("project", None, "Google Cloud project.")
  flags.DEFINE_string("region", "us-central1", "Vertex AI region.")
  flags.DEFINE_string("artifact_uri", None, "The serving export: its base folder ({model_dir}/serving) "
                      "or its version folder ({model_dir}/serving/1), gs://… or /gcs/….")
  flags.DEFINE_string("display_name", "ham10000-resnet50", "The model's name in the registry.")
  flags.DEFINE_string("serving_image", DEFAULT_SERVING_IMAGE, "Serving container: a Vertex AI pre-built "
                      "TensorFlow image (e.g. …/tf2-gpu.2-15:latest) or your TensorFlow Serving image.")
  flags.DEFINE_string("description", "ResNet-50 on HAM10000, seven classes; calibrated probabilities. "
                      "Research code, not a diagnostic device.", "The model's description.")
  flags.DEFINE_bool("dry_run", False, "Print the Model as REST JSON and upload nothing.")
  flags.DEFINE_string("output", None, "With --dry_run: write the JSON to this file.")


def artifact_for(serving_image: str, artifact_uri: str) -> str:
  """What the container reads: the SavedModel's folder for Vertex's pre-built containers, the
  base folder holding version folders for TensorFlow Serving."""
  artifact_uri = artifact_uri.rstrip("/")
  base, _, last = artifact_uri.rpartition("/")
  is_version = re.fullmatch(r"\d+", last) is not None
  if serving_image.startswith(PREBUILT_PREFIX):
    return artifact_uri if is_version else f"{artifact_uri}/{SERVING_VERSION}"
  return base if is_version else artifact_uri


def build_model(*, display_name: str, artifact_uri: str, serving_image: str, description: str = ""):
  """The Model as google.cloud.aiplatform_v1 types (no credentials needed to build it)."""
  from google.cloud import aiplatform_v1 as v1  # pylint: disable=g-import-not-at-top
  if not serving_image.strip():
    raise cli.UserError("--serving_image is empty: give a pre-built container or your TF Serving image")
  artifact_uri = artifact_for(serving_image, artifact_uri)
  container = v1.ModelContainerSpec(image_uri=serving_image)
  if not serving_image.startswith(PREBUILT_PREFIX):
    # A TensorFlow Serving image: Vertex must be told its port and routes (the pre-built
    # containers set their own).
    container.ports = [v1.Port(container_port=TF_SERVING_REST_PORT)]
    container.predict_route = f"/v1/models/{TF_SERVING_MODEL_NAME}:predict"
    container.health_route = f"/v1/models/{TF_SERVING_MODEL_NAME}"
  return v1.Model(display_name=display_name, description=description, artifact_uri=artifact_uri,
                  container_spec=container)


def upload(client, model, project: str, region: str, timeout: float = 1800):
  """Uploads with `client` (an aiplatform_v1 ModelServiceClient) and waits for the long-running
  operation; returns the registered model's resource name."""
  operation = client.upload_model(parent=f"projects/{project}/locations/{region}", model=model)
  return operation.result(timeout=timeout).model


def main(argv):
  del argv
  for name in ("artifact_uri",) + (() if FLAGS.dry_run else ("project",)):
    if not FLAGS[name].value:
      raise cli.UserError(f"--{name} is required")
  if FLAGS.output and not FLAGS.dry_run:
    raise cli.UserError("--output writes the model's JSON instead of uploading it: add --dry_run")
  model = build_model(display_name=FLAGS.display_name, serving_image=FLAGS.serving_image,
                      artifact_uri=vertex.gcs_path("artifact_uri", FLAGS.artifact_uri).rstrip("/"),
                      description=FLAGS.description)
  if FLAGS.serving_image.startswith(PREBUILT_PREFIX):
    logging.warning("%s: Vertex AI's support schedule ends its availability in %s; Dockerfile.serving "
                    "builds a TensorFlow Serving image to give as --serving_image instead",
                    FLAGS.serving_image, PREBUILT_END_OF_AVAILABILITY)
  if FLAGS.dry_run:
    vertex.print_dry_run(model, FLAGS.output)
    return
  from google.cloud import aiplatform_v1 as v1  # pylint: disable=g-import-not-at-top
  client = v1.ModelServiceClient(client_options={"api_endpoint": vertex.api_endpoint(FLAGS.region)})
  name = upload(client, model, FLAGS.project, FLAGS.region)
  print(name)


if __name__ == "__main__":
  cli.run(main, define_flags)
