"""Submitting the training job: Vertex AI custom jobs and multi-GPU VMs."""
