r"""Uploads the job's serving SavedModel to the Vertex AI Model Registry.

  python -m launch.upload_model --project=P --region=us-central1 \
      --artifact_uri=gs://B/runs/r1/model/serving --display_name=ham10000-resnet50 [--dry_run]

The training job writes the SavedModel to {model_dir}/serving (on Vertex AI,
the launcher's --model_dir + /model/serving). Its `serving_default` signature
takes JPEG bytes (`image_bytes`) and returns calibrated probabilities.

The serving container: Vertex AI's pre-built TensorFlow prediction containers
stop at 2.15, older than the TensorFlow that trains; the export uses no op 2.15
lacks, and tests/test_launch.py loads it under tensorflow-cpu 2.15 and checks
that it returns the same probabilities, so the pre-built container is the
default. `--serving_image` takes another (the GPU one, or a TensorFlow Serving
image of your own in Artifact Registry, which is then called on TF Serving's
REST routes for the model name `ham10000`). `--dry_run` prints the Model as
REST JSON (the body of models:upload's `model`) and calls nothing.
"""

from absl import flags

from launch import vertex
from tfrecords import cli

FLAGS = flags.FLAGS
PREBUILT_PREFIX = "us-docker.pkg.dev/vertex-ai/prediction/"
DEFAULT_SERVING_IMAGE = PREBUILT_PREFIX + "tf2-cpu.2-15:latest"
TF_SERVING_MODEL_NAME = "ham10000"
TF_SERVING_REST_PORT = 8501


def define_flags():
  flags.DEFINE_string("project", None, "Google Cloud project.")
  flags.DEFINE_string("region", "us-central1", "Vertex AI region.")
  flags.DEFINE_string("artifact_uri", None, "The serving SavedModel's folder: gs://… or /gcs/… "
                      "({model_dir}/serving).")
  flags.DEFINE_string("display_name", "ham10000-resnet50", "The model's name in the registry.")
  flags.DEFINE_string("serving_image", DEFAULT_SERVING_IMAGE, "Serving container: a Vertex AI pre-built "
                      "TensorFlow image (e.g. …/tf2-gpu.2-15:latest) or your TensorFlow Serving image.")
  flags.DEFINE_string("description", "ResNet-50 on HAM10000, seven classes; calibrated probabilities. "
                      "Research code, not a diagnostic device.", "The model's description.")
  flags.DEFINE_bool("dry_run", False, "Print the Model as REST JSON and upload nothing.")
  flags.DEFINE_string("output", None, "With --dry_run: write the JSON to this file.")


def build_model(*, display_name: str, artifact_uri: str, serving_image: str, description: str = ""):
  """The Model as google.cloud.aiplatform_v1 types (no credentials needed to build it)."""
  from google.cloud import aiplatform_v1 as v1  # pylint: disable=g-import-not-at-top
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
  if FLAGS.dry_run:
    vertex.print_dry_run(model, FLAGS.output)
    return
  from google.cloud import aiplatform_v1 as v1  # pylint: disable=g-import-not-at-top
  client = v1.ModelServiceClient(client_options={"api_endpoint": vertex.api_endpoint(FLAGS.region)})
  name = upload(client, model, FLAGS.project, FLAGS.region)
  print(name)


if __name__ == "__main__":
  cli.run(main, define_flags)
