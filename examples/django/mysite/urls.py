from django.urls import path

from jobs import views

urlpatterns = [
    path("jobs/<str:name>", views.job),
]
