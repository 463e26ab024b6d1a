"""Scale-out on engines people already run: extraction under torchrun, evaluation on a Dask cluster.

The submodules are imported on demand (``xfeat.scale.torchrun``, ``xfeat.scale.dask``): each pulls in its
engine (torch.distributed, Dask), which the other does not need.
"""
