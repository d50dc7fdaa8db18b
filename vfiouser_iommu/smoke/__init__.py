"""`vfiouser-iommu smoke`: the guest battery for kernel CI, with KTAP and JUnit output.

`battery` holds the suites (guest boots) and their checks, `report` the result model
and its KTAP and JUnit renderings.
"""
