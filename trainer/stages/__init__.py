"""What runs inside Ray workers: the stage table, the step loop, the training stages and the evaluation worker."""
