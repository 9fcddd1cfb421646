"""Deployable forms of a model: packed b-bit weight files (`packed`) and TFLite flatbuffers run by
the stock interpreter (`tflite`)."""
