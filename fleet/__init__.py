"""Fleet learning on Flower: many devices learn their own classes, one model knows them all.

A device's knowledge under the analytic learner is two sums (G and the per-class sums) over its
images; the fleet's sum is exactly what one device would hold after seeing every device's images.
Devices send only what they added since the last round, the coordinator adds them up, picks lambda
from the devices' held-out votes and every device publishes the solved model through its own store.

Layers: ``wire`` and ``merge`` are numpy only (no Flower, no torch); ``device`` and ``coordinator``
work on stores through the product's own code; ``app`` is the Flower ServerApp/ClientApp;
``runtime`` starts Flower's SuperLink/SuperNodes and ``flwr run`` as processes."""
