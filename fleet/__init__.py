"""Fleet learning on Flower: many devices learn their own classes, one model knows them all.

A device's knowledge under the analytic learner is two sums (G and the per-class sums) over its
images; the fleet's sum is exactly what one device would hold after seeing every device's images.
Devices send only what they added since the last round, the coordinator adds them up, picks lambda
from the devices' held-out votes and every device publishes the solved model through its own store.

Gradient-trained stores merge too (``--merge fedavg | fusion``, ``average`` and ``weights_device``):
each device trains its concept head with ``cvm update`` from the fleet's weights and uploads them;
the coordinator publishes their image-weighted mean (FedAvg) or their ConDU fusion.

Layers: ``wire``, ``merge`` and ``average`` are numpy only (no Flower; torch only inside fusion);
``device``, ``weights_device`` and ``coordinator`` work on stores through the product's own code;
``app`` is the Flower ServerApp/ClientApp;
``runtime`` starts Flower's SuperLink/SuperNodes and ``flwr run`` as processes."""
