"""Using a trained model: batched generation under a routing policy (``generate``), the wall-clock of
prefill and decode (``bench``) and the interleaved timing it rests on (``timing``)."""
