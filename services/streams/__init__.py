"""An answer's life: the stream in Redis (store, scripts), its owner's worker asking its backend, the batched appends,
the finish, and the poll that any replica answers."""
