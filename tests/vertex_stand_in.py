"""A local stand-in for Vertex AI's JobService and ModelService, for the real aiplatform_v1 clients.

The package ships no generated servicer, so generic gRPC handlers answer the
methods the launchers call, with the request and response messages' own
(de)serialisers. Jobs go through the states given, one per GetX call; a model
upload is a long-running operation that is done at its first GetOperation.
"""

import concurrent.futures

import grpc
from google.cloud import aiplatform_v1 as v1
from google.longrunning import operations_pb2
from google.protobuf import any_pb2

SERVICE = "google.cloud.aiplatform.v1.JobService"
MODEL_SERVICE = "google.cloud.aiplatform.v1.ModelService"
OPERATIONS = "google.longrunning.Operations"


class JobServiceStandIn:
  """Serves on 127.0.0.1; `states` are the states a created job reports, one per get; a tuning
  job that ends reports `trials`, (id, final value of its metric or None, state name) each."""

  def __init__(self, states=(), trials=()):
    self.states, self.trials = list(states), list(trials)
    self.created, self.gets, self.uploaded, self.operation_gets = [], 0, [], 0
    handlers = {
        "CreateCustomJob": self._unary(self._create_custom_job, v1.CreateCustomJobRequest, v1.CustomJob),
        "GetCustomJob": self._unary(self._get(v1.CustomJob), v1.GetCustomJobRequest, v1.CustomJob),
        "CreateHyperparameterTuningJob": self._unary(self._create_tuning_job,
                                                     v1.CreateHyperparameterTuningJobRequest,
                                                     v1.HyperparameterTuningJob),
        "GetHyperparameterTuningJob": self._unary(self._get(v1.HyperparameterTuningJob),
                                                  v1.GetHyperparameterTuningJobRequest,
                                                  v1.HyperparameterTuningJob),
    }
    models = {"UploadModel": self._unary(self._upload_model, v1.UploadModelRequest, operations_pb2.Operation)}
    operations = {"GetOperation": self._unary(self._get_operation, operations_pb2.GetOperationRequest,
                                              operations_pb2.Operation)}
    self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers),
                                          grpc.method_handlers_generic_handler(MODEL_SERVICE, models),
                                          grpc.method_handlers_generic_handler(OPERATIONS, operations)])
    self.port = self.server.add_insecure_port("127.0.0.1:0")
    self.server.start()

  def client(self) -> v1.JobServiceClient:
    """The real client, over a plain channel to this server."""
    from google.cloud.aiplatform_v1.services.job_service.transports import grpc as transports
    channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
    return v1.JobServiceClient(transport=transports.JobServiceGrpcTransport(channel=channel))

  def model_client(self) -> v1.ModelServiceClient:
    from google.cloud.aiplatform_v1.services.model_service.transports import grpc as transports
    channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
    return v1.ModelServiceClient(transport=transports.ModelServiceGrpcTransport(channel=channel))

  def stop(self):
    self.server.stop(None)

  @staticmethod
  def _unary(function, request_type, response_type):
    # proto-plus messages (aiplatform_v1) and plain protobuf ones (google.longrunning) alike
    deserialize = getattr(request_type, "deserialize", None) or request_type.FromString
    serialize = getattr(response_type, "serialize", None) or response_type.SerializeToString
    return grpc.unary_unary_rpc_method_handler(function, request_deserializer=deserialize,
                                               response_serializer=serialize)

  def _upload_model(self, request, context):
    self.uploaded.append(request)
    return operations_pb2.Operation(name=f"{request.parent}/models/7/operations/1", done=False)

  def _get_operation(self, request, context):
    self.operation_gets += 1
    parent = self.uploaded[-1].parent
    response = any_pb2.Any()
    response.Pack(v1.UploadModelResponse.pb(v1.UploadModelResponse(model=f"{parent}/models/7")))
    return operations_pb2.Operation(name=request.name, done=True, response=response)

  def _job(self, job, parent, kind):
    job = type(job).deserialize(type(job).serialize(job))
    job.name = f"{parent}/{kind}/{1000 + len(self.created)}"
    job.state = self.states[0]
    self.created.append(job)
    return job

  def _create_custom_job(self, request, context):
    return self._job(request.custom_job, request.parent, "customJobs")

  def _create_tuning_job(self, request, context):
    return self._job(request.hyperparameter_tuning_job, request.parent, "hyperparameterTuningJobs")

  def _get(self, job_type):
    def get(request, context):
      job = next((j for j in self.created if j.name == request.name), None)
      if job is None or not isinstance(job, job_type):
        context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} not found")
      self.gets += 1
      job.state = self.states[min(self.gets, len(self.states) - 1)]
      if job.state == v1.JobState.JOB_STATE_FAILED:
        job.error.message = "The replica workerpool0-0 exited with a non-zero status of 1."
      if isinstance(job, v1.HyperparameterTuningJob) and job.state == v1.JobState.JOB_STATE_SUCCEEDED:
        metric = job.study_spec.metrics[0].metric_id
        job.trials = [v1.Trial(id=trial_id, state=v1.Trial.State[state], final_measurement=v1.Measurement(
            metrics=[] if value is None else [v1.Measurement.Metric(metric_id=metric, value=value)]))
                      for trial_id, value, state in self.trials]
      return job
    return get
