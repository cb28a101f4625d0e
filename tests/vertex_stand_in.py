"""A local stand-in for Vertex AI's JobService, for the real aiplatform_v1 client.

The package ships no generated servicer, so a generic gRPC handler answers the
methods the launcher calls, with the request and response messages' own
(de)serialisers. Jobs go through the states given, one per GetX call.
"""

import concurrent.futures

import grpc
from google.cloud import aiplatform_v1 as v1

SERVICE = "google.cloud.aiplatform.v1.JobService"


class JobServiceStandIn:
  """Serves on 127.0.0.1; `states` are the states a created job reports, one per get."""

  def __init__(self, states):
    self.states = list(states)
    self.created, self.gets = [], 0
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
    self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    self.port = self.server.add_insecure_port("127.0.0.1:0")
    self.server.start()

  def client(self) -> v1.JobServiceClient:
    """The real client, over a plain channel to this server."""
    from google.cloud.aiplatform_v1.services.job_service.transports import grpc as transports
    channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
    return v1.JobServiceClient(transport=transports.JobServiceGrpcTransport(channel=channel))

  def stop(self):
    self.server.stop(None)

  @staticmethod
  def _unary(function, request_type, response_type):
    return grpc.unary_unary_rpc_method_handler(function, request_deserializer=request_type.deserialize,
                                               response_serializer=response_type.serialize)

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
      return job
    return get
