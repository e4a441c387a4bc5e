"""The Keras half of bench_keras.py; runs in the Keras venv (.venv-keras), never imports cnnlab.

Reads the exact split that cnnlab trains on (an .npz of uint8 images written by bench_keras.py)
and a Keras layer list as JSON, then trains with model.fit like a tutorial (pixels / 255, Adam,
sparse categorical cross-entropy). A line protocol on stdin/stdout lets the driver alternate
Keras and cnnlab epoch by epoch: "epoch" trains one epoch and answers its seconds,
"evaluate" answers the test accuracy and ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np


def build(keras, layers: list[dict], input_shape: tuple[int, int, int]):
    model = keras.Sequential([keras.Input(shape=input_shape)])
    for item in layers:
        ((kind, args),) = item.items()
        model.add(getattr(keras.layers, kind)(**args))
    return model


def emit(payload: dict) -> None:
    print(json.dumps(payload), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--layers", required=True, help="JSON list of {Kind: {args}}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    data = np.load(args.data)
    # (N, C, H, W) uint8 -> (N, H, W, C) float32 in [0, 1], as the tutorials rescale
    x_train = data["x_train"].transpose(0, 2, 3, 1).astype("float32") / 255.0
    x_test = data["x_test"].transpose(0, 2, 3, 1).astype("float32") / 255.0
    y_train, y_test = data["y_train"], data["y_test"]
    model = build(keras, json.loads(args.layers), x_train.shape[1:])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=args.lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    emit(
        {
            "framework": f"keras {keras.__version__} / tensorflow {tf.__version__}",
            "params": int(model.count_params()),
        }
    )
    epoch = 0
    for line in sys.stdin:
        command = line.strip()
        if command == "epoch":
            started = time.perf_counter()
            model.fit(
                x_train,
                y_train,
                batch_size=args.batch_size,
                epochs=epoch + 1,
                initial_epoch=epoch,
                shuffle=True,
                verbose=0,
            )
            epoch += 1
            emit({"seconds": time.perf_counter() - started})
        elif command == "evaluate":
            started = time.perf_counter()
            _, accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
            rate = len(x_test) / (time.perf_counter() - started)
            emit({"test_accuracy": float(accuracy), "eval_images_per_second": rate})
            return


if __name__ == "__main__":
    main()
