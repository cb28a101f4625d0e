# The seed project's inference example (shared/seed/ham10000-resnet50.txt), verbatim
# but for its two paths, which tests/test_train.py fills in.
from tensorflow.keras.models import load_model
import tensorflow as tf
import numpy as np
import json
from pathlib import Path

# Load model & label map
model = load_model("{model_dir}/best_model.keras")
with open("{model_dir}/label_map.json") as f:
    label_map = json.load(f)
labels = list(label_map.keys())

# Prediction helper
def predict_image(image_path):
    img = tf.io.read_file(image_path)
    img = tf.image.decode_jpeg(img, channels=3)
    img = tf.image.resize(img, (224,224))
    img = tf.cast(img, tf.float32)
    img = tf.keras.applications.resnet50.preprocess_input(img)
    img = tf.expand_dims(img, axis=0)
    preds = model.predict(img)[0]
    idx = np.argmax(preds)
    return labels[idx], float(preds[idx])

print(predict_image("{image_path}"))
