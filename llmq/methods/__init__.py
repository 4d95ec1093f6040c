"""Methods: apply a solver to the linears of one decoder layer while it runs."""
