"""End to end on scikit-learn's bundled digits."""

import numpy as np
from sklearn.model_selection import train_test_split

from daskdist import MLP, DaskNeuralNetClassifier


def test_local_sgd_reaches_095_on_digits(client, digits):
    X, y = digits
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y,
                                                        random_state=0)
    net = DaskNeuralNetClassifier(
        MLP, module__hidden=(128,), max_epochs=25, lr=0.05, batch_size=64,
        optimizer__momentum=0.9, strategy="local_sgd", sync_every=4, sharding="stratified",
        iterator_train__shuffle=True, random_state=0, verbose=0,
    ).fit(X_train, y_train)
    accuracy = float(np.mean(net.predict(X_test) == y_test))
    assert accuracy >= 0.95, accuracy
    assert net.history[-1, "valid_acc"] > 0.9
