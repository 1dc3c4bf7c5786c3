"""``/jobs/<name>``: POST (JSON fields of etcdcron.Job) adds, GET shows the status, DELETE."""

import json

from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from etcdcron import Job, ValidationError
from jobs import scheduler


@csrf_exempt
def job(request, name):
    cron = scheduler.cron()
    if request.method == "POST":
        try:
            cron.add(name, Job(**json.loads(request.body or b"{}")))
        except (ValidationError, TypeError, ValueError) as exc:
            return JsonResponse({"error": str(exc)}, status=400)
        return JsonResponse({"added": name}, status=201)
    if request.method == "DELETE":
        cron.delete(name)
        return HttpResponse(status=204)
    status = cron.status(name)
    if status is None:
        return JsonResponse({"error": f"no job named {name!r}"}, status=404)
    return JsonResponse({"name": status.name, "count": status.count, "owner": status.owner,
                         "next_trigger": status.next_trigger and status.next_trigger.isoformat()})
