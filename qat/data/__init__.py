"""Speech clips -> features, without quantization: data sets and splits (`datasets`), the front end
and its cache (`features`), training-clip augmentation (`augment`)."""
