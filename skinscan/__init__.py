"""SkinScan core: settings, database models, image storage and labels shared by web, worker and training."""

__version__ = "0.1.0"
