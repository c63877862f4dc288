"""DiHT pipeline core library: pure logic, no Prefect and no MLflow."""

__version__ = "0.1.0"
