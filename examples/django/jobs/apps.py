from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"

    def ready(self):
        from jobs import scheduler

        if scheduler.should_start():
            scheduler.start()
