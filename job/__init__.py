"""The HAM10000 ResNet-50 training job: data, model, distribution, training, evaluation."""
