"""Journal backends behind scheduler.store.Store, chosen by `store.url`."""
